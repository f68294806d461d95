//! `/api/v1/stats`: the numbers `/metrics` has (every `protobalance_*` family, same names,
//! labels and values) as XML, plus the directory's totals.

use hyper::StatusCode;
use prometheus::proto::MetricType;

use super::{ApiResponse, ApiState, xml::Writer, xml_response};
use crate::directory::MailboxDirectory as _;

pub async fn get(state: &ApiState) -> ApiResponse {
    let total = state.directory.store().mailbox_count().await.ok();
    let mut w = Writer::document("stats", &[]);
    if let Some(total) = total {
        let total = total.to_string();
        w.empty("directory", &[("mailboxes", &total)]);
    }
    for family in state.registry.gather() {
        if !family.name().starts_with("protobalance_") {
            continue;
        }
        let kind = match family.get_field_type() {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::HISTOGRAM => "histogram",
            MetricType::SUMMARY => "summary",
            // Not used by protobalance's collectors.
            MetricType::UNTYPED => continue,
        };
        w.start("metric", &[("name", family.name()), ("type", kind)]);
        for metric in family.get_metric() {
            let value = match family.get_field_type() {
                MetricType::COUNTER => metric.get_counter().get_value(),
                MetricType::GAUGE => metric.get_gauge().get_value(),
                MetricType::HISTOGRAM => metric.get_histogram().get_sample_count() as f64,
                MetricType::SUMMARY => metric.get_summary().sample_count() as f64,
                MetricType::UNTYPED => continue,
            };
            let value = xsd_double(value);
            let labels = metric.get_label();
            if labels.is_empty() {
                w.empty("sample", &[("value", &value)]);
                continue;
            }
            w.start("sample", &[("value", &value)]);
            for label in labels {
                w.empty("label", &[("name", label.name()), ("value", label.value())]);
            }
            w.end();
        }
        w.end();
    }
    xml_response(StatusCode::OK, w.finish())
}

/// `f64` as an XML Schema `double` (`INF`, `-INF`, `NaN` spelled its way).
fn xsd_double(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "INF" } else { "-INF" }.into()
    } else {
        value.to_string()
    }
}

//! The PostgreSQL test server itself: it starts, answers, keeps its data across a
//! restart, refuses connections while stopped, and leaves no process behind.

use std::net::{SocketAddr, TcpStream};

use anyhow::{Result, ensure};
use protobalance_tests::{PostgresServer, process::child_pids, require_postgres};

#[test]
fn postgres_starts_keeps_data_across_restart_and_stops() -> Result<()> {
    if !require_postgres("postgres_starts_keeps_data_across_restart_and_stops") {
        return Ok(());
    }
    let mut pg = PostgresServer::start()?;
    pg.psql("CREATE TABLE t (v integer); INSERT INTO t VALUES (41), (1)")?;
    assert_eq!(pg.psql("SELECT sum(v) FROM t")?, "42");
    let addr = SocketAddr::from(([127, 0, 0, 1], pg.port()));
    pg.stop()?;
    ensure!(
        TcpStream::connect(addr).is_err(),
        "a stopped server still accepts connections"
    );
    pg.restart()?;
    assert_eq!(pg.psql("SELECT sum(v) FROM t")?, "42");
    let err = pg
        .psql("SELECT * FROM missing")
        .expect_err("bad SQL is an error");
    ensure!(format!("{err:#}").contains("missing"), "{err:#}");
    drop(pg);
    ensure!(
        TcpStream::connect(addr).is_err(),
        "the server outlived its guard"
    );
    ensure!(
        child_pids(std::process::id()).is_empty(),
        "processes left behind: {:?}",
        child_pids(std::process::id())
    );
    Ok(())
}

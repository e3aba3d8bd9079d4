//! The throughput anchor of scenario 5 (BENCHMARKS.md): a Pingora proxy with no filters, built
//! by the benchmark. `bare_pingora <listen port> <upstream port> <threads>`.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Bare(u16);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            ("127.0.0.1", self.0),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let arg = |n: usize| std::env::args().nth(n).and_then(|a| a.parse::<u16>().ok());
    let (listen, upstream, threads) = match (arg(1), arg(2), arg(3)) {
        (Some(l), Some(u), Some(t)) => (l, u, t),
        _ => panic!("usage: bare_pingora <listen port> <upstream port> <threads>"),
    };
    let conf = ServerConf {
        threads: threads.into(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare(upstream));
    proxy.add_tcp(&format!("127.0.0.1:{listen}"));
    server.add_service(proxy);
    server.run_forever();
}

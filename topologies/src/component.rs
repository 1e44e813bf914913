//! One Isthmus process, by kind. `isthmusctl component KIND ...` runs these;
//! so does the e2e harness's node binary. One binary that can be any
//! component is what lets `cargo run -p isthmusctl -- up` work from a fresh
//! clone.

#[derive(Debug, clap::Subcommand)]
pub enum Component {
    /// The control plane: store, CA root, agent sync and xDS on 15012, REST
    /// API on 15014 (what `isthmus-primary` runs).
    Primary(isthmus_primary::Config),
    /// A cluster's agent: joins the primary, streams the cluster's services
    /// from a file registry or Kubernetes, signs workload certificates on a
    /// Unix socket (what `isthmus-agent` runs).
    Agent(isthmus_agent::Config),
    /// An east-west gateway: routes mesh mTLS into its network by SNI on
    /// 15443 without decrypting it (what `isthmus-gateway` runs).
    Gateway(isthmus_gateway::Config),
    /// A workload's sidecar: outbound HTTP from the app on 15001, inbound
    /// mesh mTLS on 15006 (what `isthmus-proxy` runs).
    Proxy(isthmus_proxy::Config),
    /// The sample echo service: answers with its cluster, workload and the
    /// request's headers (what `isthmus-echo` runs).
    Echo(isthmus_echo::Config),
}

impl Component {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Component::Primary(c) => isthmus_primary::run(c).await,
            Component::Agent(c) => isthmus_agent::run(c).await,
            Component::Gateway(c) => isthmus_gateway::run(c).await,
            Component::Proxy(c) => isthmus_proxy::run(c).await,
            Component::Echo(c) => isthmus_echo::run(c).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        component: Component,
    }

    fn parse(args: &[&str]) -> Component {
        Cli::try_parse_from(std::iter::once("component").chain(args.iter().copied()))
            .expect("the arguments parse")
            .component
    }

    /// An agent, a gateway and a sidecar started on one host with their
    /// defaults listen on distinct ports: only a second sidecar needs its
    /// own `--admin` and `--metrics`.
    #[test]
    fn defaults_of_one_host_do_not_collide() {
        let p = "https://192.0.2.1:15012";
        let mut bound = Vec::new();
        match parse(&[
            "agent",
            "--primary",
            p,
            "--cluster",
            "c",
            "--registry",
            "r.yaml",
        ]) {
            Component::Agent(c) => bound.push(("agent admin", c.admin)),
            _ => unreachable!("parsed as agent"),
        }
        match parse(&[
            "gateway",
            "--primary",
            p,
            "--cluster",
            "c",
            "--token-file",
            "t",
            "--roots",
            "r",
        ]) {
            Component::Gateway(c) => {
                bound.push(("gateway listen", c.listen));
                bound.push(("gateway admin", c.admin));
                bound.push(("gateway metrics", c.metrics));
            }
            _ => unreachable!("parsed as gateway"),
        }
        match parse(&[
            "proxy",
            "--primary",
            p,
            "--cluster",
            "c",
            "--agent-socket",
            "ca.sock",
            "--token-file",
            "t",
        ]) {
            Component::Proxy(c) => {
                bound.push(("sidecar outbound", c.outbound));
                bound.push(("sidecar inbound", c.inbound));
                bound.push(("sidecar admin", c.admin));
                bound.push(("sidecar metrics", c.metrics));
                assert_eq!(c.admin.port(), isthmus_api::ports::ADMIN);
                assert_eq!(c.metrics.port(), isthmus_api::ports::METRICS);
            }
            _ => unreachable!("parsed as proxy"),
        }
        for (i, (a, x)) in bound.iter().enumerate() {
            for (b, y) in &bound[i + 1..] {
                assert_ne!(x.port(), y.port(), "{a} and {b} share a port");
            }
        }
        assert!(bound.contains(&("agent admin", "127.0.0.1:15020".parse().unwrap())));
        assert!(bound.contains(&("gateway admin", "127.0.0.1:15100".parse().unwrap())));
        assert!(bound.contains(&("gateway metrics", "127.0.0.1:15190".parse().unwrap())));
    }
}

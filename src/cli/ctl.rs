//! `pp ctl status|save|stop|abort --rdzv HOST[:PORT]`: asks a running multi-node training,
//! through its rendezvous, from any machine that holds the cluster token.

use std::time::Duration;

use anyhow::{bail, Context};
use pp_transport::rendezvous::{control, ControlReply, ControlRequest, GroupStatus};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Action {
    /// The group, its workers and devices, and the latest step, loss, tokens/s and bubble.
    Status,
    /// Every worker saves a checkpoint at its next step, and training goes on.
    Save,
    /// Every worker saves and stops after the same step; every node exits cleanly.
    Stop,
    /// Every node ends now, without saving.
    Abort,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to do.
    #[arg(value_enum)]
    action: Action,
    /// The run's rendezvous, HOST[:PORT] (port 29400 when not given).
    #[arg(long)]
    rdzv: String,
    /// The cluster token [default: $PP_TOKEN]. Prefer PP_TOKEN: other users can read command
    /// lines.
    #[arg(long)]
    token: Option<String>,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let token = args
        .token
        .or_else(|| std::env::var("PP_TOKEN").ok())
        .filter(|token| !token.is_empty())
        .context("no cluster token: pass --token or set PP_TOKEN")?;
    let address = pp::cluster::node::resolve(&args.rdzv)?;
    let request = match args.action {
        Action::Status => ControlRequest::Status,
        Action::Save => ControlRequest::Save,
        Action::Stop => ControlRequest::Stop,
        Action::Abort => ControlRequest::Abort,
    };
    match control(address, &token, request, Duration::from_secs(10))? {
        ControlReply::Status(status) if args.json => {
            println!("{}", serde_json::to_string(&status)?)
        }
        ControlReply::Status(status) => print_status(&args.rdzv, &status),
        ControlReply::Done(text) => println!("{text}"),
        ControlReply::Refused(reason) => bail!("{reason}"),
    }
    Ok(())
}

fn print_status(rendezvous: &str, status: &GroupStatus) {
    println!("group at {rendezvous}: {}", status.phase);
    if let Some(waiting) = &status.waiting {
        println!("  {waiting}");
    }
    for node in &status.nodes {
        for (local, worker) in node.workers.iter().enumerate() {
            println!(
                "  rank {}: {node}, {}",
                node.first_rank + local,
                worker.device
            );
        }
    }
    if let Some(progress) = &status.progress {
        println!("  {progress}");
    }
}

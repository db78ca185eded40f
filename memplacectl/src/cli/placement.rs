//! `memplacectl populate`, `placement` and `reconcile`: allocating a range's pages, seeing where
//! they are, and re-applying drift.

use super::render::{self, alarm, human};
use super::{Output, SpanArgs, parse_size};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use memplace_client::{Client, ClientError, pb};

#[derive(Args, Debug)]
pub(crate) struct PopulateArgs {
    #[command(flatten)]
    pub(crate) span: SpanArgs,
    /// Worker threads (0 = default).
    #[arg(long, default_value_t = 0)]
    pub(crate) threads: u32,
    /// Memory cgroup to charge, e.g. /sys/fs/cgroup/memory/vm1.
    #[arg(long, default_value = "")]
    pub(crate) cgroup: String,
    /// Skip reading each page's node back from the kernel (faster on a fresh file; the summary
    /// then lists no nodes: see `placement`).
    #[arg(long)]
    pub(crate) no_verify: bool,
}

/// `populate`, with a progress bar on a terminal; Ctrl-C cancels.
pub(crate) async fn populate(
    c: &mut Client,
    p: &PopulateArgs,
    out: Output,
) -> Result<(), ClientError> {
    let req = pb::PopulateRequest {
        vm_id: p.span.vm.clone(),
        name: p.span.name.clone(),
        offset: parse_size(&p.span.offset)?,
        length: parse_size(&p.span.length)?,
        threads: p.threads,
        cgroup: p.cgroup.clone(),
        verify: !p.no_verify,
    };
    // A progress bar on a terminal (indicatif draws nothing where stderr is not one).
    let bar = (out == Output::Table).then(|| {
        ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "[{bar:30}] {bytes} / {total_bytes}  {bytes_per_sec}  ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("#."),
        )
    });
    let work = c.populate(req, |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    });
    // Ctrl-C drops the stream, which the agent treats as cancellation.
    let s = tokio::select! {
        r = work => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ncancelled: pages already allocated stay allocated");
            return Err(ClientError::Status(tonic::Status::cancelled("cancelled by the user")));
        }
    };
    if let Some(b) = bar {
        b.finish();
    }
    render::print(out, &s, || populate_table(&s));
    Ok(())
}

fn populate_table(s: &pb::PopulateSummary) {
    println!(
        "populated {} of {} in {:.2}s with {} workers ({}/s){}",
        human(s.bytes_done),
        human(s.bytes_total),
        s.elapsed_seconds,
        s.threads,
        human((s.bytes_done as f64 / s.elapsed_seconds.max(0.001)) as u64),
        if s.cancelled { " - cancelled" } else { "" }
    );
    for n in &s.nodes {
        println!("  node {}: {} pages", n.node, n.pages);
    }
}

/// `placement`: pages per node, and the misplaced ones.
pub(crate) async fn placement(
    c: &mut Client,
    span: &SpanArgs,
    out: Output,
) -> Result<(), ClientError> {
    let p = c
        .placement(
            &span.vm,
            &span.name,
            parse_size(&span.offset)?,
            parse_size(&span.length)?,
        )
        .await?;
    render::print(out, &p, || placement_table(span, &p));
    Ok(())
}

fn placement_table(span: &SpanArgs, p: &pb::GetPlacementResponse) {
    let present: u64 = p.nodes.iter().map(|n| n.pages).sum();
    let all = present + p.pages_not_present + p.pages_unknown;
    println!(
        "{}/{}: {} pages of {} ({} allocated)",
        span.vm,
        span.name,
        all,
        human(p.page_size_bytes),
        human(present * p.page_size_bytes)
    );
    for n in &p.nodes {
        let frac = if all > 0 {
            n.pages as f64 / all as f64
        } else {
            0.0
        };
        let bar = "#".repeat((frac * 40.0).round() as usize);
        println!(
            "  node {:<3} {:>10} pages {:>10}  {:<40} {:5.1}%",
            n.node,
            n.pages,
            human(n.pages * p.page_size_bytes),
            bar,
            frac * 100.0
        );
    }
    println!("  not allocated {:>8} pages", p.pages_not_present);
    if let Some(how) = counted_from(&p.ranges) {
        println!("  counted from  {how}");
    }
    if p.ranges.len() > 1 {
        for r in &p.ranges {
            let nodes: Vec<String> = r
                .nodes
                .iter()
                .map(|n| format!("node {}: {}", n.node, n.pages))
                .collect();
            let line = format!(
                "  range {:#x}+{}: {}; {} not allocated, {} misplaced{}",
                r.offset,
                human(r.length),
                if nodes.is_empty() {
                    "no pages".into()
                } else {
                    nodes.join(", ")
                },
                r.pages_not_present,
                r.pages_misplaced,
                match r.counted_from_pid {
                    0 => String::new(),
                    pid => format!("; counted from pid {pid}"),
                }
            );
            if r.pages_misplaced > 0 {
                println!("{}", alarm(&line));
            } else {
                println!("{line}");
            }
        }
    }
    if p.pages_unknown > 0 {
        println!("  unknown node  {:>8} pages", p.pages_unknown);
    }
    if p.pages_misplaced > 0 {
        let line = format!(
            "  MISPLACED     {:>8} pages on nodes the policy does not allow",
            p.pages_misplaced
        );
        println!("{}", alarm(&line));
    } else {
        println!("  misplaced     {:>8} pages", 0);
    }
}

/// `reconcile`: compare intent with the kernel now and re-apply drift.
pub(crate) async fn reconcile(c: &mut Client, vm: &str, out: Output) -> Result<(), ClientError> {
    let r = c.reconcile(vm).await?;
    render::print(out, &r, || {
        println!(
            "checked {} ranges in {} regions: {} drifted, {} re-applied, {} failed; not checked: {} task-policy, {} lost, {} unmapped",
            r.ranges_checked,
            r.regions_checked,
            r.ranges_drifted,
            r.ranges_reapplied,
            r.ranges_failed,
            r.ranges_task_policy,
            r.ranges_lost,
            r.ranges_unmapped
        )
    });
    Ok(())
}

/// Who counted the allocated pages, for the table: a holder's page tables (its pid), the
/// agent's own window (read faults), or both for different ranges. `None` when no range has an
/// allocated page.
fn counted_from(ranges: &[pb::RangePlacement]) -> Option<String> {
    let counted: Vec<i32> = ranges
        .iter()
        .filter(|r| r.nodes.iter().any(|n| n.pages > 0) || r.pages_unknown > 0)
        .map(|r| r.counted_from_pid)
        .collect();
    let held = counted.iter().filter(|pid| **pid != 0).count();
    let mut pids: Vec<i32> = counted.iter().copied().filter(|pid| *pid != 0).collect();
    pids.sort_unstable();
    pids.dedup();
    let pids = pids
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match (held, counted.len()) {
        (_, 0) => None,
        (0, _) => Some("the agent's window (read faults of the allocated pages)".into()),
        (h, n) if h == n => Some(format!("the holder's page tables (pid {pids})")),
        (h, n) => Some(format!(
            "the holder's page tables (pid {pids}) for {h} of {n} ranges, the agent's window for the rest"
        )),
    }
}

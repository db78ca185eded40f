//! `memplacectl libvirt-hook NAME OP SUBOP EXTRA`: libvirt's qemu hook
//! (/etc/libvirt/hooks/qemu, deploy/libvirt/qemu), with the domain XML on stdin.
//!
//! - `started begin` (QEMU runs, its pid file exists, the guest has not run yet): attach the
//!   domain's QEMU as VM NAME, then make each region's intent what `<numatune>` asks for its
//!   guest cell (`<memnode cellid=…>`, else `<memory>`), see [`intent_of`].
//! - `release end` (the domain is gone): delete the VM's regions.
//! - `reconnect begin` (libvirtd restarted and finds the domain running) and every other
//!   operation: nothing.

use super::render::enum_name;
use clap::Args;
use memplace_client::{Client, ClientError, pb};
use std::io::Read;
use std::path::PathBuf;

/// Arguments of `libvirt-hook`.
#[derive(Args, Debug)]
#[command(after_help = "\
Install as /etc/libvirt/hooks/qemu (see deploy/libvirt/qemu); libvirtd reads hooks when it \
starts. At `started begin` it attaches the domain's QEMU (pid from PID_DIR/NAME.pid) as VM NAME \
and turns <numatune> into each region's intent: strict -> bind, preferred -> preferred (several \
nodes: preferred-many), interleave -> interleave, restrictive -> default (libvirt restricts only \
the cgroup's cpuset.mems). A failure exits non-zero and libvirt does not start the domain. At \
`release end` it deletes the VM's regions; other operations (`reconnect begin` when libvirtd \
restarts) change nothing.")]
pub struct LibvirtHookArgs {
    /// Domain name (becomes the VM id).
    pub name: String,
    /// libvirt's operation (prepare, start, started, stopped, release, reconnect, ...).
    pub op: String,
    /// libvirt's sub-operation (begin, end, -).
    pub subop: String,
    /// libvirt's extra argument.
    pub extra: Option<String>,
    /// Where libvirt writes each domain's QEMU pid (NAME.pid).
    #[arg(long, default_value = "/run/libvirt/qemu")]
    pub pid_dir: PathBuf,
}

/// A `<numatune>` mode, as libvirt spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumaMode {
    /// `strict`: QEMU binds the backend (`policy=bind`).
    Strict,
    /// `preferred`: `policy=preferred`.
    Preferred,
    /// `interleave`: `policy=interleave`.
    Interleave,
    /// `restrictive`: only the cgroup's cpuset.mems, no memory policy.
    Restrictive,
}

/// One `<memory>` or `<memnode>` of `<numatune>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaTune {
    /// The guest cell (`<memnode cellid>`), or `None` for `<memory>` (every cell).
    pub cell: Option<u32>,
    /// The mode (libvirt's default is strict).
    pub mode: NumaMode,
    /// The host nodes; `None` with `placement='auto'` (numad decides).
    pub nodes: Option<Vec<u32>>,
}

/// The `<numatune>` of a domain XML, `<memory>` first.
pub fn numatune(xml: &str) -> Result<Vec<NumaTune>, ClientError> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| ClientError::Invalid(format!("the domain XML does not parse: {e}")))?;
    let Some(tune) = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("numatune"))
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for n in tune.children().filter(|n| n.is_element()) {
        let cell = match n.tag_name().name() {
            "memory" => None,
            "memnode" => Some(
                n.attribute("cellid")
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| ClientError::Invalid("<memnode> without a cellid".into()))?,
            ),
            _ => continue,
        };
        let mode = match n.attribute("mode").unwrap_or("strict") {
            "strict" => NumaMode::Strict,
            "preferred" => NumaMode::Preferred,
            "interleave" => NumaMode::Interleave,
            "restrictive" => NumaMode::Restrictive,
            m => {
                return Err(ClientError::Invalid(format!(
                    "<numatune> mode {m:?} is not one libvirt 9 knows"
                )));
            }
        };
        let nodes = n.attribute("nodeset").map(nodeset).transpose()?;
        out.push(NumaTune { cell, mode, nodes });
    }
    out.sort_by_key(|t| t.cell.is_some());
    Ok(out)
}

/// libvirt's nodeset syntax: `0-3,5,^2`.
fn nodeset(s: &str) -> Result<Vec<u32>, ClientError> {
    let bad = || ClientError::Invalid(format!("bad nodeset {s:?}"));
    let mut nodes = std::collections::BTreeSet::new();
    let mut minus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (neg, p) = match part.strip_prefix('^') {
            Some(p) => (true, p),
            None => (false, part),
        };
        let (a, b) = match p.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => {
                let n: u32 = p.parse().map_err(|_| bad())?;
                (n, n)
            }
        };
        if a > b {
            return Err(bad());
        }
        if neg {
            minus.extend(a..=b);
        } else {
            nodes.extend(a..=b);
        }
    }
    for m in minus {
        nodes.remove(&m);
    }
    if nodes.is_empty() {
        return Err(bad());
    }
    Ok(nodes.into_iter().collect())
}

/// The memplace intent for guest cell `cell` (`None`: not known) from `<numatune>`: its
/// `<memnode>`, else `<memory>`; `None` when numatune says nothing placeable (no numatune, or
/// placement='auto').
pub fn intent_of(tune: &[NumaTune], cell: Option<u32>) -> Option<(pb::Policy, &NumaTune)> {
    let t = tune
        .iter()
        .find(|t| t.cell.is_some() && t.cell == cell)
        .or_else(|| tune.iter().find(|t| t.cell.is_none()))?;
    let nodes = t.nodes.clone()?;
    let mode = match t.mode {
        NumaMode::Strict => pb::PolicyMode::Bind,
        NumaMode::Preferred if nodes.len() == 1 => pb::PolicyMode::Preferred,
        NumaMode::Preferred => pb::PolicyMode::PreferredMany,
        NumaMode::Interleave => pb::PolicyMode::Interleave,
        NumaMode::Restrictive => pb::PolicyMode::Default,
    };
    let nodes = if mode == pb::PolicyMode::Default {
        Vec::new()
    } else {
        nodes
    };
    Some((
        pb::Policy {
            mode: mode as i32,
            nodes,
            static_nodes: false,
            relative_nodes: false,
        },
        t,
    ))
}

/// Runs the hook.
pub async fn hook(cli: &super::Cli, a: &LibvirtHookArgs) -> Result<(), ClientError> {
    match (a.op.as_str(), a.subop.as_str()) {
        ("started", "begin") => started(cli, a).await,
        ("release", "end") => release(cli, a).await,
        (op, sub) => {
            println!("memplace: {} {op} {sub}: nothing to do", a.name);
            Ok(())
        }
    }
}

async fn started(cli: &super::Cli, a: &LibvirtHookArgs) -> Result<(), ClientError> {
    let mut xml = String::new();
    std::io::stdin()
        .read_to_string(&mut xml)
        .map_err(|e| ClientError::Invalid(format!("reading the domain XML on stdin: {e}")))?;
    let tune = numatune(&xml)?;
    let pid_file = a.pid_dir.join(format!("{}.pid", a.name));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .map_err(|e| ClientError::Invalid(format!("{}: {e}", pid_file.display())))?
        .trim()
        .parse()
        .map_err(|_| ClientError::Invalid(format!("{} holds no pid", pid_file.display())))?;
    let mut c = super::connect(cli).await?;
    let attached = c.attach_process(&a.name, pid).await?;
    for r in &attached.regions {
        let cell = r
            .guest_cell
            .map_or("cell unknown".to_string(), |c| format!("guest cell {c}"));
        let Some((want, t)) = intent_of(&tune, r.guest_cell) else {
            println!(
                "memplace: {}/{} ({cell}) attached from pid {pid}; no numatune for it",
                r.vm_id, r.name
            );
            continue;
        };
        let now: Vec<_> = r.ranges.iter().map(|x| x.intended.clone()).collect();
        let action = if now == [Some(want.clone())] {
            "already the intent"
        } else {
            set_whole(&mut c, r, want.clone()).await?;
            "set"
        };
        println!(
            "memplace: {}/{} ({cell}) attached from pid {pid}; numatune {:?} {:?} -> {} {:?} ({action})",
            r.vm_id,
            r.name,
            t.mode,
            t.nodes.clone().unwrap_or_default(),
            enum_name(want.mode().as_str_name(), "POLICY_MODE_"),
            want.nodes
        );
    }
    Ok(())
}

/// SetPolicy over a whole region, without moving pages (the guest has not run yet).
async fn set_whole(c: &mut Client, r: &pb::Region, p: pb::Policy) -> Result<(), ClientError> {
    c.set_policy(&r.vm_id, &r.name, 0, 0, p, false).await?;
    Ok(())
}

async fn release(cli: &super::Cli, a: &LibvirtHookArgs) -> Result<(), ClientError> {
    let mut c = super::connect(cli).await?;
    for r in c.list_regions(&a.name).await? {
        match c.delete_region(&r.vm_id, &r.name).await {
            Ok(_) => println!("memplace: deleted {}/{}", r.vm_id, r.name),
            Err(e) if e.code() == Some(tonic::Code::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numatune_becomes_intent_per_cell() {
        let xml = r#"<domain type='qemu'><name>d</name>
          <numatune>
            <memnode cellid='1' mode='interleave' nodeset='0-3,^2'/>
            <memory mode='preferred' nodeset='2'/>
          </numatune></domain>"#;
        let t = numatune(xml).unwrap();
        assert_eq!(t[0].cell, None);
        let (p, _) = intent_of(&t, Some(1)).unwrap();
        assert_eq!(
            (p.mode(), p.nodes),
            (pb::PolicyMode::Interleave, vec![0, 1, 3])
        );
        let (p, _) = intent_of(&t, Some(0)).unwrap();
        assert_eq!((p.mode(), p.nodes), (pb::PolicyMode::Preferred, vec![2]));
        let (p, _) = intent_of(&t, None).unwrap();
        assert_eq!(p.mode(), pb::PolicyMode::Preferred);

        let strict =
            numatune("<domain><numatune><memory nodeset='0'/></numatune></domain>").unwrap();
        let (p, _) = intent_of(&strict, Some(0)).unwrap();
        assert_eq!((p.mode(), p.nodes), (pb::PolicyMode::Bind, vec![0]));
        let r = numatune(
            "<domain><numatune><memory mode='restrictive' nodeset='0'/></numatune></domain>",
        )
        .unwrap();
        let (p, _) = intent_of(&r, Some(0)).unwrap();
        assert_eq!((p.mode(), p.nodes), (pb::PolicyMode::Default, vec![]));
        let many = numatune(
            "<domain><numatune><memory mode='preferred' nodeset='0-1'/></numatune></domain>",
        )
        .unwrap();
        assert_eq!(
            intent_of(&many, None).unwrap().0.mode(),
            pb::PolicyMode::PreferredMany
        );
        let auto = numatune(
            "<domain><numatune><memory mode='strict' placement='auto'/></numatune></domain>",
        )
        .unwrap();
        assert!(intent_of(&auto, Some(0)).is_none());
        assert!(numatune("<domain/>").unwrap().is_empty());
        assert!(
            numatune("<domain><numatune><memory mode='scatter' nodeset='0'/></numatune></domain>")
                .is_err()
        );
        assert!(nodeset("3-1").is_err());
        assert!(nodeset("^0").is_err());
    }
}

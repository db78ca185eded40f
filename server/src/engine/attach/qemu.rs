//! QEMU's memory backends, read from its command line (/proc/PID/cmdline, in the `key=value` or
//! the JSON form libvirt writes), and which attached file is which backend.
//!
//! QEMU names every backend memfd `memory-backend-memfd`, so a file's name says nothing. A file
//! is named after a backend only when the kernel proves it: the backend is the only
//! `memory-backend-memfd` of the file's size, the file is the only memfd of that size in the
//! process, and QEMU maps it whole (one shared mapping at offset 0 as long as the backend, which
//! /proc/PID/maps shows). Backends of equal size cannot be told apart this way (nothing the kernel
//! shows differs between them), so their files keep today's names and the attach event says why.

use std::collections::BTreeMap;

/// A memory backend on QEMU's command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuBackend {
    /// The object's id (`pc.ram`, `ram-node0`, ...).
    pub id: String,
    /// The QOM type (`memory-backend-memfd`, ...).
    pub qom_type: String,
    /// Size in bytes, when it parses.
    pub size: Option<u64>,
    /// The guest NUMA cell it backs: the `-numa node` with `memdev=ID`, or 0 for the machine's
    /// only backend (`-machine memory-backend=ID`) in a guest without `-numa`.
    pub cell: Option<u32>,
}

/// One attached file as the matcher needs it.
#[derive(Clone, Copy, Debug)]
pub struct FileShape<'a> {
    /// Whether it is a memfd (guest_memfd files are not QEMU memory backends).
    pub memfd: bool,
    /// Its size.
    pub size: u64,
    /// Its shared mappings in the process: (start, length, file offset).
    pub mappings: &'a [(u64, u64, u64)],
}

/// What the command line and the kernel tell about one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendMatch {
    /// Proven: the file is this backend; `how` says why, for the event.
    Proven {
        /// The backend.
        backend: QemuBackend,
        /// The proof, in words.
        how: String,
    },
    /// Not proven, and why.
    Unproven(String),
}

/// The memory backends on a QEMU command line, in order; empty when the process is not QEMU or
/// declares none.
pub fn backends(cmdline: &[String]) -> Vec<QemuBackend> {
    let is_qemu = cmdline
        .first()
        .and_then(|a| a.rsplit('/').next())
        .is_some_and(|a| a.starts_with("qemu"));
    if !is_qemu {
        return Vec::new();
    }
    let mut out: Vec<QemuBackend> = Vec::new();
    let mut cells: BTreeMap<String, u32> = BTreeMap::new();
    let mut next_node = 0u32;
    let mut machine_backend = None;
    let mut numa_nodes = 0;
    let mut args = cmdline.iter().skip(1);
    while let Some(a) = args.next() {
        let opt = a.trim_start_matches('-');
        if !a.starts_with('-') || !matches!(opt, "object" | "numa" | "machine" | "M") {
            continue;
        }
        let Some(value) = args.next() else { break };
        let props = options(value, implied_key(opt));
        match opt {
            "object" => {
                let (Some(t), Some(id)) = (props.get("qom-type"), props.get("id")) else {
                    continue;
                };
                if t.starts_with("memory-backend-") {
                    out.push(QemuBackend {
                        id: id.clone(),
                        qom_type: t.clone(),
                        size: props.get("size").and_then(|s| parse_size(s)),
                        cell: None,
                    });
                }
            }
            "numa" if props.get("type").is_none_or(|t| t == "node") => {
                numa_nodes += 1;
                let id = props
                    .get("nodeid")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(next_node);
                next_node = id + 1;
                if let Some(dev) = props.get("memdev") {
                    cells.insert(dev.clone(), id);
                }
            }
            "machine" | "M" => {
                if let Some(b) = props.get("memory-backend") {
                    machine_backend = Some(b.clone());
                }
            }
            _ => {}
        }
    }
    for b in &mut out {
        b.cell = cells.get(&b.id).copied().or_else(|| {
            (numa_nodes == 0 && machine_backend.as_deref() == Some(b.id.as_str())).then_some(0)
        });
    }
    out
}

/// The key of an option's first, unnamed value (`-object memory-backend-memfd,...`).
fn implied_key(opt: &str) -> &'static str {
    match opt {
        "object" => "qom-type",
        "numa" => "type",
        _ => "type",
    }
}

/// An option's properties: a JSON object (`{"qom-type":...}`), or `key=value,...` where `,,` is
/// a literal comma and a first value without `=` belongs to `implied`.
fn options(value: &str, implied: &str) -> BTreeMap<String, String> {
    if value.trim_start().starts_with('{') {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str(value) else {
            return BTreeMap::new();
        };
        return map
            .into_iter()
            .filter_map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                Some((k, v))
            })
            .collect();
    }
    let mut out = BTreeMap::new();
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for (i, p) in parts.into_iter().enumerate() {
        match p.split_once('=') {
            Some((k, v)) => {
                out.insert(k.to_string(), v.to_string());
            }
            None if i == 0 && !p.is_empty() => {
                out.insert(implied.to_string(), p);
            }
            None => {}
        }
    }
    out
}

/// A QEMU size: bytes, or a whole number with a suffix B, K, M, G, T, P or E (powers of 1024).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.chars().last()? {
        c if c.is_ascii_digit() => (s, 0),
        c => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return None,
            };
            (&s[..s.len() - 1], shift)
        }
    };
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// For each file, in order, the backend it is proven to be (see the module docs).
pub fn match_files(backends: &[QemuBackend], files: &[FileShape<'_>]) -> Vec<BackendMatch> {
    let memfd_backends: Vec<&QemuBackend> = backends
        .iter()
        .filter(|b| b.qom_type == "memory-backend-memfd")
        .collect();
    files
        .iter()
        .map(|f| {
            if !f.memfd {
                return BackendMatch::Unproven("not a memfd".into());
            }
            let same: Vec<&&QemuBackend> = memfd_backends
                .iter()
                .filter(|b| b.size == Some(f.size))
                .collect();
            let [b] = same.as_slice() else {
                return BackendMatch::Unproven(if same.is_empty() {
                    format!(
                        "no memory-backend-memfd of {} bytes on QEMU's command line",
                        f.size
                    )
                } else {
                    format!(
                        "backends {} are all {} bytes, and nothing the kernel shows tells their \
                         memfds apart (QEMU names every one memory-backend-memfd)",
                        same.iter()
                            .map(|b| b.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        f.size
                    )
                });
            };
            let twins = files.iter().filter(|o| o.memfd && o.size == f.size).count();
            if twins != 1 {
                return BackendMatch::Unproven(format!(
                    "QEMU holds {twins} memfds of {} bytes but declares one such backend ({})",
                    f.size, b.id
                ));
            }
            let Some(&(start, length, _)) = f
                .mappings
                .iter()
                .find(|&&(_, length, offset)| offset == 0 && length == f.size)
            else {
                return BackendMatch::Unproven(format!(
                    "QEMU does not map the {} bytes of the file whole, as it maps backend {}",
                    f.size, b.id
                ));
            };
            BackendMatch::Proven {
                backend: (**b).clone(),
                how: format!(
                    "the only memory-backend-memfd of {} bytes ({}) and the only such memfd, \
                     mapped whole at {start:#x}-{:#x} in /proc/PID/maps",
                    f.size,
                    b.id,
                    start + length
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn backends_from_key_value_and_libvirt_json() {
        let kv = args(&[
            "/usr/bin/qemu-system-x86_64",
            "-object",
            "memory-backend-memfd,id=ram-node0,size=64M,share=on",
            "-object",
            "memory-backend-memfd,id=ram-node1,size=128M,share=on,host-nodes=0,policy=bind",
            "-numa",
            "node,nodeid=0,memdev=ram-node0",
            "-numa",
            "node,memdev=ram-node1",
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
        ]);
        let b = backends(&kv);
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[0].id.as_str(), b[0].size, b[0].cell),
            ("ram-node0", Some(64 << 20), Some(0))
        );
        assert_eq!(
            (b[1].id.as_str(), b[1].size, b[1].cell),
            ("ram-node1", Some(128 << 20), Some(1))
        );
        // libvirt 9.0: JSON objects, the single backend named by -machine.
        let lv = args(&[
            "qemu-system-x86_64",
            "-machine",
            "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
            "-object",
            r#"{"qom-type":"memory-backend-memfd","id":"pc.ram","share":true,"x-use-canonical-path-for-ramblock-id":false,"size":268435456}"#,
        ]);
        let b = backends(&lv);
        assert_eq!(
            b,
            vec![QemuBackend {
                id: "pc.ram".into(),
                qom_type: "memory-backend-memfd".into(),
                size: Some(256 << 20),
                cell: Some(0),
            }]
        );
        assert!(
            backends(&args(&[
                "/bin/sleep",
                "-object",
                "memory-backend-memfd,id=x,size=1M"
            ]))
            .is_empty()
        );
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1.5G"), None);
        let o = options("a,,b,id=x,,y", "qom-type");
        assert_eq!(o.get("qom-type").map(String::as_str), Some("a,b"));
        assert_eq!(o.get("id").map(String::as_str), Some("x,y"));
    }

    #[test]
    fn only_what_the_kernel_proves_is_named() {
        let b = |id: &str, size: u64, cell| QemuBackend {
            id: id.into(),
            qom_type: "memory-backend-memfd".into(),
            size: Some(size),
            cell: Some(cell),
        };
        let whole = |size| [(0x7f00_0000_0000u64, size, 0u64)];
        let (m64, m128) = (whole(64), whole(128));
        let f = |size, mappings: &'static [(u64, u64, u64)]| FileShape {
            memfd: true,
            size,
            mappings,
        };
        let m64: &'static [_] = Box::leak(Box::new(m64));
        let m128: &'static [_] = Box::leak(Box::new(m128));
        // Files found in the other order than declared: matched by size, not order.
        let got = match_files(
            &[b("n0", 64, 0), b("n1", 128, 1)],
            &[f(128, m128), f(64, m64)],
        );
        let ids: Vec<_> = got
            .iter()
            .map(|m| match m {
                BackendMatch::Proven { backend, .. } => (backend.id.clone(), backend.cell),
                BackendMatch::Unproven(w) => panic!("{w}"),
            })
            .collect();
        assert_eq!(
            ids,
            [("n1".to_string(), Some(1)), ("n0".to_string(), Some(0))]
        );
        // Equal sizes: not provable.
        let got = match_files(&[b("n0", 64, 0), b("n1", 64, 1)], &[f(64, m64), f(64, m64)]);
        assert!(
            matches!(&got[0], BackendMatch::Unproven(w) if w.contains("n0, n1 are all 64 bytes")),
            "{got:?}"
        );
        // Not mapped whole: not provable.
        let got = match_files(&[b("n0", 64, 0)], &[f(64, &[(0x1000, 32, 0)])]);
        assert!(
            matches!(&got[0], BackendMatch::Unproven(w) if w.contains("whole")),
            "{got:?}"
        );
        // No such backend.
        let got = match_files(&[b("n0", 64, 0)], &[f(128, m128)]);
        assert!(matches!(&got[0], BackendMatch::Unproven(_)), "{got:?}");
    }
}

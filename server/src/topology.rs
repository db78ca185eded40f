//! Host NUMA topology from sysfs and procfs, read from a root path so tests can point it at a
//! fixture tree.

use crate::domain::NodeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A huge page pool of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HugepagePool {
    /// Page size in bytes.
    pub page_size: u64,
    /// Pages in the pool.
    pub total: u64,
    /// Free pages.
    pub free: u64,
}

/// One NUMA node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Node id.
    pub id: u32,
    /// CPU ids.
    pub cpus: Vec<u32>,
    /// MemTotal in bytes.
    pub mem_total: u64,
    /// MemFree in bytes.
    pub mem_free: u64,
    /// Distances to each node, in node order.
    pub distances: Vec<u32>,
    /// Huge page pools.
    pub hugepages: Vec<HugepagePool>,
}

/// The host's nodes and the agent's allowed set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Online nodes.
    pub nodes: Vec<Node>,
    /// Nodes with memory, in the agent's Mems_allowed: where it may place pages.
    pub usable: NodeSet,
}

/// Reads topology below a root directory (`/` on a real host).
#[derive(Clone, Debug)]
pub struct TopologyReader {
    root: PathBuf,
}

impl TopologyReader {
    /// A reader of the real host.
    pub fn host() -> Self {
        Self { root: "/".into() }
    }

    /// A reader of a fixture tree.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Reads everything. Missing files read as empty (a kernel without NUMA has node0 only or none).
    pub fn read(&self) -> Topology {
        let node_dir = self.path("sys/devices/system/node");
        let online = read_list(&node_dir.join("online"));
        let nodes: Vec<Node> = online
            .iter()
            .map(|id| read_node(&node_dir.join(format!("node{id}")), id))
            .collect();
        Topology {
            nodes,
            usable: self.usable_of(online),
        }
    }

    fn usable_of(&self, online: NodeSet) -> NodeSet {
        let with_memory = read_list(&self.path("sys/devices/system/node/has_memory"));
        let allowed = std::fs::read_to_string(self.path("proc/self/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Mems_allowed_list:"))
                    .map(|v| NodeSet::parse_list(v.trim()).unwrap_or_default())
            })
            .unwrap_or(online);
        let mut usable = NodeSet::new();
        for id in with_memory.iter().filter(|id| allowed.contains(*id)) {
            let _ = usable.insert(id);
        }
        usable
    }
}

/// How long the cached topology stands before a request reads sysfs again. The shape the engine
/// checks requests against (usable nodes, huge page sizes) changes only with hotplug or a cpuset
/// change, so a request need not walk every node's sysfs directory.
pub const TOPOLOGY_REFRESH: Duration = Duration::from_secs(2);

/// A [`TopologyReader`] with the last reading cached: [`TopologyCache::cached`] answers from it
/// while it is younger than the refresh interval, [`TopologyCache::read_now`] always reads (and
/// refreshes the cache). Requests that only check against the host's shape use the first;
/// requests that need free memory as it is now (GetTopology, Populate's capacity check) the second.
#[derive(Debug)]
pub struct TopologyCache {
    reader: TopologyReader,
    refresh: Duration,
    last: parking_lot::Mutex<Option<(Instant, Arc<Topology>)>>,
}

impl TopologyCache {
    /// A cache over `reader`, refreshed every [`TOPOLOGY_REFRESH`].
    pub fn new(reader: TopologyReader) -> Self {
        Self::with_refresh(reader, TOPOLOGY_REFRESH)
    }

    /// A cache refreshed every `refresh`.
    pub fn with_refresh(reader: TopologyReader, refresh: Duration) -> Self {
        Self {
            reader,
            refresh,
            last: parking_lot::Mutex::new(None),
        }
    }

    /// The topology as last read, read again when older than the refresh interval.
    pub fn cached(&self) -> Arc<Topology> {
        if let Some((at, t)) = self.last.lock().as_ref()
            && at.elapsed() < self.refresh
        {
            return t.clone();
        }
        Arc::new(self.read_now())
    }

    /// Reads the topology now, and caches it.
    pub fn read_now(&self) -> Topology {
        let t = self.reader.read();
        *self.last.lock() = Some((Instant::now(), Arc::new(t.clone())));
        t
    }
}

fn read_list(path: &Path) -> NodeSet {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| NodeSet::parse_list(s.trim()).ok())
        .unwrap_or_default()
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn read_node(dir: &Path, id: u32) -> Node {
    let cpus = std::fs::read_to_string(dir.join("cpulist"))
        .ok()
        .and_then(|s| NodeSet::parse_list(s.trim()).ok())
        .map(|s| s.iter().collect())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string(dir.join("meminfo")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| {
                let (_, rest) = l.split_once(&format!(" {name}:"))?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .unwrap_or(0)
            * 1024
    };
    let distances = std::fs::read_to_string(dir.join("distance"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|d| d.parse().ok())
        .collect();
    let mut hugepages: Vec<HugepagePool> = std::fs::read_dir(dir.join("hugepages"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let kb: u64 = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            Some(HugepagePool {
                page_size: kb * 1024,
                total: read_u64(&e.path().join("nr_hugepages")),
                free: read_u64(&e.path().join("free_hugepages")),
            })
        })
        .collect();
    hugepages.sort_by_key(|h| h.page_size);
    Node {
        id,
        cpus,
        mem_total: field("MemTotal"),
        mem_free: field("MemFree"),
        distances,
        hugepages,
    }
}

impl Topology {
    /// The node with id `id`.
    pub fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn reads_a_two_node_fixture() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(r, "sys/devices/system/node/online", "0-1\n");
        write(r, "sys/devices/system/node/has_memory", "0-1\n");
        write(r, "proc/self/status", "Name:\tx\nMems_allowed_list:\t1\n");
        for (n, cpus) in [(0, "0-1"), (1, "2-3")] {
            let d = format!("sys/devices/system/node/node{n}");
            write(r, &format!("{d}/cpulist"), cpus);
            write(
                r,
                &format!("{d}/meminfo"),
                &format!("Node {n} MemTotal:       1024 kB\nNode {n} MemFree:        512 kB\n"),
            );
            write(
                r,
                &format!("{d}/distance"),
                if n == 0 { "10 20\n" } else { "20 10\n" },
            );
            write(
                r,
                &format!("{d}/hugepages/hugepages-2048kB/nr_hugepages"),
                "4\n",
            );
            write(
                r,
                &format!("{d}/hugepages/hugepages-2048kB/free_hugepages"),
                "3\n",
            );
        }
        let t = TopologyReader::at(r).read();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[1].cpus, vec![2, 3]);
        assert_eq!(t.nodes[0].mem_total, 1024 * 1024);
        assert_eq!(t.nodes[0].mem_free, 512 * 1024);
        assert_eq!(t.nodes[1].distances, vec![20, 10]);
        assert_eq!(
            t.nodes[0].hugepages,
            vec![HugepagePool {
                page_size: 2 << 20,
                total: 4,
                free: 3
            }]
        );
        // Only node 1 is in Mems_allowed.
        assert_eq!(t.usable.to_string(), "1");
    }

    #[test]
    fn reads_this_host() {
        let t = TopologyReader::host().read();
        assert!(!t.nodes.is_empty(), "the host has at least one node");
        assert!(!t.usable.is_empty());
        assert!(t.nodes[0].mem_total > 0);
    }

    /// The cache answers from its last reading until it is refreshed, by a full read or because
    /// the interval has passed (here: never, and always).
    #[test]
    fn the_cache_answers_from_the_last_reading() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(r, "sys/devices/system/node/online", "0\n");
        write(r, "sys/devices/system/node/has_memory", "0\n");
        let never = TopologyCache::with_refresh(TopologyReader::at(r), Duration::MAX);
        let always = TopologyCache::with_refresh(TopologyReader::at(r), Duration::ZERO);
        assert_eq!(never.cached().usable.to_string(), "0");
        assert_eq!(always.cached().usable.to_string(), "0");
        write(r, "sys/devices/system/node/online", "0-1\n");
        write(r, "sys/devices/system/node/has_memory", "0-1\n");
        assert_eq!(
            never.cached().usable.to_string(),
            "0",
            "cached until refreshed"
        );
        assert_eq!(always.cached().usable.to_string(), "0-1");
        assert_eq!(never.read_now().usable.to_string(), "0-1");
        assert_eq!(
            never.cached().usable.to_string(),
            "0-1",
            "a full read refreshes it"
        );
    }
}

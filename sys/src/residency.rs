//! Which pages of a file are allocated, and on which node, read without allocating any.
//!
//! The page cache (cachestat) tells which pages are allocated, whoever maps them and whether or
//! not anyone touched them (hugetlbfs, which lacks it, is probed page by page instead). The node
//! of a page can be read only through a mapping of this process, so [`count_nodes_census`]
//! asks move_pages about the pages a mapping of the file already maps and read-faults into it
//! just the allocated pages it does not map yet (a read fault on an allocated page allocates
//! nothing). A census mapping the caller keeps holds those pages for the next count;
//! [`count_nodes`] counts through a window of exactly the range, which goes with its page-table
//! entries when the count returns.

use super::Mapping;
use nix::errno::Errno;
use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::os::fd::BorrowedFd;

const ENOENT: i32 = -libc::ENOENT;

/// Which pages of `[offset, offset+len)` of a file of `file_len` bytes are allocated, one bool per
/// page of `page` bytes: from the page cache (cachestat), or for hugetlbfs, which has none, by
/// probing each huge page through a mapping whose holes fail instead of allocating.
pub fn allocated(
    fd: BorrowedFd<'_>,
    file_len: u64,
    offset: u64,
    len: u64,
    page: u64,
) -> Result<Vec<bool>, Errno> {
    match super::files::allocated_map(fd, offset, len, page) {
        Err(Errno::EOPNOTSUPP) => {
            super::files::hugetlb_allocated_map(fd, file_len, offset, len, page)
        }
        r => r,
    }
}

/// Where the pages of a range are, in pages of the size asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCounts {
    /// Allocated pages per node.
    pub nodes: BTreeMap<u32, u64>,
    /// Pages not allocated.
    pub not_present: u64,
    /// Allocated pages whose node could not be read (their read fault failed).
    pub unknown: u64,
    /// The pid of the holder whose page tables were counted ([`HolderMappings::exact_counts`]),
    /// or `None` when the pages were read-faulted into the caller's own window (or none is
    /// allocated).
    pub counted_from: Option<i32>,
}

/// Counts the pages of `[offset, offset+len)` of a file of `file_len` bytes per node, exactly,
/// without allocating: pages not allocated are never touched. `offset` must be aligned as
/// [`Mapping::window`] requires.
pub fn count_nodes(
    fd: BorrowedFd<'_>,
    file_len: u64,
    offset: u64,
    len: u64,
    page: u64,
) -> Result<NodeCounts, Errno> {
    count_nodes_held(fd, file_len, offset, len, page, None)
}

/// [`count_nodes`], but first from a holder's page tables where they map every allocated page of
/// the range exactly once ([`HolderMappings::exact_counts`]): the holder already faulted them,
/// so nothing is faulted here. Where they map every page of the range (a VMM that touched all
/// of its memory), every page is allocated, and the page cache is not read either. Otherwise
/// the allocated pages are counted through a window of exactly the range, a census that keeps
/// nothing ([`count_nodes_census`]).
pub fn count_nodes_held(
    fd: BorrowedFd<'_>,
    file_len: u64,
    offset: u64,
    len: u64,
    page: u64,
    holder: Option<&HolderMappings>,
) -> Result<NodeCounts, Errno> {
    if let Some(c) = holder_counts(holder, offset, len, len / page, 0) {
        return Ok(c);
    }
    let window = Mapping::window(fd, offset, len)?;
    count_nodes_census(
        fd,
        &window,
        &mut CensusRuns::default(),
        (file_len, offset, len, page),
        holder,
        false,
    )
}

/// The counts of `[offset, offset+len)` from the holder's page tables, where they count the
/// range's `allocated` pages exactly ([`HolderMappings::exact_counts`]); `not_present` pages of
/// the range are not allocated.
fn holder_counts(
    holder: Option<&HolderMappings>,
    offset: u64,
    len: u64,
    allocated: u64,
    not_present: u64,
) -> Option<NodeCounts> {
    let h = holder?;
    Some(NodeCounts {
        nodes: h.exact_counts(offset, len, allocated)?,
        not_present,
        unknown: 0,
        counted_from: Some(h.pid),
    })
}

/// The file intervals a census mapping has had read-faulted into it by [`count_nodes_census`]:
/// pages outside them are not mapped there, so they are never asked about page by page (a
/// sparse range is read from the page cache, which skips holes cheaply). Sorted, disjoint,
/// merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CensusRuns(Vec<(u64, u64)>);

impl CensusRuns {
    /// Bytes recorded as mapped.
    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|r| r.1).sum()
    }

    /// Forgets every interval (after the census's pages were unmapped).
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Records the intervals `(at, len)` as mapped.
    pub fn insert(&mut self, runs: impl IntoIterator<Item = (u64, u64)>) {
        self.0.extend(runs);
        self.0.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.0.len());
        for &(a, l) in &self.0 {
            match merged.last_mut() {
                Some((pa, pl)) if a <= *pa + *pl => *pl = (*pl).max(a + l - *pa),
                _ => merged.push((a, l)),
            }
        }
        self.0 = merged;
    }

    /// `[offset, offset+len)` split into `(at, len, recorded)` pieces in order.
    fn split(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        for &(a, l) in &self.0 {
            let (s, e) = (a.max(at), (a + l).min(end));
            if s >= e {
                continue;
            }
            if s > at {
                out.push((at, s - at, false));
            }
            out.push((s, e - s, true));
            at = e;
        }
        if at < end {
            out.push((at, end - at, false));
        }
        out
    }
}

/// [`count_nodes_held`], counted through `census`, a long-lived shared mapping of the whole file
/// that keeps the pages it counted mapped from one call to the next, so that what is already
/// mapped is never faulted again. `runs` records what the census maps:
/// - move_pages asks the census for the node of every page it maps in the range (in parallel
///   where that is large). A page mapped in a shared mapping of the file is a page of its page
///   cache, so each one that answers a node is allocated and counted; a page punched since was
///   unmapped from the census by the punch itself.
/// - The page cache is read only over the rest of the range (and over recorded pages that no
///   longer answer); its allocated pages are read-faulted into the census (a read fault on an
///   allocated page allocates nothing) and asked.
///
/// Where the holder's mappings count the range exactly, they answer as in [`count_nodes_held`].
/// With `keep` false the pages this call faulted are unmapped again before it returns (the
/// census is over its budget), which leaves the census as it was.
pub fn count_nodes_census(
    fd: BorrowedFd<'_>,
    census: &Mapping,
    runs_mapped: &mut CensusRuns,
    (file_len, offset, len, page): (u64, u64, u64, u64),
    holder: Option<&HolderMappings>,
    keep: bool,
) -> Result<NodeCounts, Errno> {
    if let Some(c) = holder_counts(holder, offset, len, len / page, 0) {
        return Ok(c);
    }
    let mut status = vec![ENOENT; (len / page) as usize];
    let mut ask = Vec::new();
    for (at, l, recorded) in runs_mapped.split(offset, len) {
        if recorded {
            let first = ((at - offset) / page) as usize;
            let got = page_nodes_parallel(census, at, l, page)?;
            status[first..first + got.len()].copy_from_slice(&got);
            ask.extend(runs_where(&got, at, page, |s| s < 0));
        } else {
            ask.push((at, l));
        }
    }
    // Which of the pages not mapped in the census are allocated: the page cache, over those only.
    let mut faulted = Vec::new();
    let mut allocated_elsewhere = 0u64;
    for &(at, l) in &ask {
        let map = allocated(fd, file_len, at, l, page)?;
        allocated_elsewhere += map.iter().filter(|a| **a).count() as u64;
        faulted.extend(runs(&map, at, page));
    }
    let mapped = status.iter().filter(|s| **s >= 0).count() as u64;
    let allocated_pages = mapped + allocated_elsewhere;
    let mut counts = NodeCounts {
        not_present: len / page - allocated_pages,
        ..Default::default()
    };
    if allocated_pages == 0 {
        return Ok(counts);
    }
    if let Some(c) = holder_counts(holder, offset, len, allocated_pages, counts.not_present) {
        return Ok(c);
    }
    for &(at, l) in &faulted {
        // A failed fault leaves pages unmapped, which the count reports as unknown.
        let _ = census.populate_read(at, l);
        let first = ((at - offset) / page) as usize;
        let got = page_nodes_parallel(census, at, l, page)?;
        status[first..first + got.len()].copy_from_slice(&got);
        if !keep {
            let _ = census.unmap_pages(at, l);
        }
    }
    if keep {
        runs_mapped.insert(faulted);
    }
    let now_mapped = status.iter().filter(|s| **s >= 0).count() as u64;
    counts.unknown = allocated_pages.saturating_sub(now_mapped);
    for s in status {
        if let Ok(n) = u32::try_from(s) {
            *counts.nodes.entry(n).or_default() += 1;
        }
    }
    Ok(counts)
}

/// Pages at or above which [`page_nodes_parallel`] splits the query over threads (256 MiB of base
/// pages): below it a thread costs more than it saves.
const PARALLEL_PAGES: u64 = 1 << 16;

/// [`Mapping::page_nodes`], split over up to four threads (and no more than the CPUs this
/// process may run on) for a large range: move_pages takes the mapping lock for reading only, so
/// the parts do not wait for each other.
fn page_nodes_parallel(
    mapping: &Mapping,
    offset: u64,
    len: u64,
    page: u64,
) -> Result<Vec<i32>, Errno> {
    let pages = len / page;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let parts = (pages / PARALLEL_PAGES).min(cpus).clamp(1, 4);
    if parts == 1 {
        return mapping.page_nodes(offset, len, page);
    }
    let per = pages.div_ceil(parts);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..parts)
            .map(|i| {
                let first = i * per;
                let n = per.min(pages - first);
                s.spawn(move || mapping.page_nodes(offset + first * page, n * page, page))
            })
            .collect();
        let mut out = Vec::with_capacity(pages as usize);
        for h in handles {
            out.extend(h.join().map_err(|_| Errno::EIO)??);
        }
        Ok(out)
    })
}

/// The runs `(offset, len)` of pages whose status satisfies `pick`.
fn runs_where(
    status: &[i32],
    offset: u64,
    page: u64,
    pick: impl Fn(i32) -> bool,
) -> Vec<(u64, u64)> {
    let map: Vec<bool> = status.iter().map(|s| pick(*s)).collect();
    runs(&map, offset, page)
}

/// One `MAP_SHARED` mapping of a file in another process (a holder): the file interval it maps
/// and the pages per node the kernel found mapped in it (its `/proc/PID/numa_maps` line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderVma {
    /// Start address in the holder.
    pub start: u64,
    /// File offset of the first byte mapped.
    pub file_offset: u64,
    /// Bytes mapped.
    pub len: u64,
    /// Pages per node mapped in it now.
    pub nodes: BTreeMap<u32, u64>,
}

/// The shared mappings of one file in a holder process, read from its `/proc/PID/maps` (which
/// names each mapping's file by device and inode) and `/proc/PID/numa_maps` (per-node counts of
/// the pages its page tables map), joined by start address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HolderMappings {
    /// The holder's pid.
    pub pid: i32,
    /// Its shared mappings of the file, by start address.
    pub vmas: Vec<HolderVma>,
}

/// `(start, end, file offset)` of each shared mapping of `file_id` in a `/proc/PID/maps` text.
fn shared_mappings_of(maps: &str, file_id: (u64, u64)) -> Vec<(u64, u64, u64)> {
    let (major, minor) = (libc::major(file_id.0) as u64, libc::minor(file_id.0) as u64);
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_ascii_whitespace();
            let (start, end) = f.next()?.split_once('-')?;
            let perms = f.next()?;
            let offset = u64::from_str_radix(f.next()?, 16).ok()?;
            let (maj, min) = f.next()?.split_once(':')?;
            let ino: u64 = f.next()?.parse().ok()?;
            let dev = (
                u64::from_str_radix(maj, 16).ok()?,
                u64::from_str_radix(min, 16).ok()?,
            );
            (perms.as_bytes().get(3) == Some(&b's') && dev == (major, minor) && ino == file_id.1)
                .then_some(())?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            Some((start, end, offset))
        })
        .collect()
}

/// Reads how process `pid` maps the file `file_id` (`(st_dev, st_ino)` of a file the caller
/// holds open, so the inode cannot be reused: a process that maps it maps this very file, and a
/// reused pid cannot pass for the holder). Both files are read through one handle on
/// `/proc/PID`, which keeps naming the process it was opened for. The maps are read again after
/// numa_maps; when the holder's mappings of the file changed meanwhile this fails with EAGAIN.
/// Reading numa_maps walks the holder's page tables and allocates nothing; it is skipped (no
/// mappings returned) when no range of `ranges` (file offset, length) could be counted from them
/// ([`HolderMappings::exact_counts`]).
pub fn holder_mappings(
    pid: i32,
    file_id: (u64, u64),
    ranges: &[(u64, u64)],
) -> Result<HolderMappings, Errno> {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    use std::io::Read;
    let dir = nix::fcntl::open(
        format!("/proc/{pid}").as_str(),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let read_maps = || -> Result<Vec<(u64, u64, u64)>, Errno> {
        let fd = openat(
            &dir,
            "maps",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut text = String::new();
        std::fs::File::from(fd)
            .read_to_string(&mut text)
            .map_err(io_errno)?;
        Ok(shared_mappings_of(&text, file_id))
    };
    let found = read_maps()?;
    let mut out = HolderMappings {
        pid,
        vmas: Vec::new(),
    };
    // Walking the holder's page tables is worth it only for a range its mappings could count
    // exactly (a VMM that maps the whole file cannot count one of several ranges).
    let usable = |&(offset, len): &(u64, u64)| {
        mappings_fit(found.iter().map(|&(s, e, o)| (o, e - s)), offset, len)
    };
    if !ranges.iter().any(usable) {
        return Ok(out);
    }
    let fd = openat(
        &dir,
        "numa_maps",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut want: BTreeMap<u64, (u64, u64)> = found
        .iter()
        .map(|&(start, end, offset)| (start, (end - start, offset)))
        .collect();
    // Lines come in address order; stop after the last one wanted so the kernel walks no
    // further mappings.
    let last = want.keys().next_back().copied().unwrap_or(0);
    let reader = std::io::BufReader::with_capacity(64 << 10, std::fs::File::from(fd));
    for line in reader.lines() {
        let line = line.map_err(io_errno)?;
        let Some(start) = line
            .split_once(' ')
            .and_then(|(a, _)| u64::from_str_radix(a, 16).ok())
        else {
            continue;
        };
        if let Some((len, file_offset)) = want.remove(&start) {
            out.vmas.push(HolderVma {
                start,
                file_offset,
                len,
                nodes: parse_numa_maps_line(&line),
            });
        }
        if start >= last {
            break;
        }
    }
    if !want.is_empty() || read_maps()? != found {
        return Err(Errno::EAGAIN);
    }
    Ok(out)
}

impl HolderMappings {
    /// The pages per node of `[offset, offset+len)` as the holder's page tables map them, but
    /// only where that is exact: the shared mappings that touch the range lie inside it, map
    /// no file page twice, and map `allocated` pages in all (the range's allocated pages, from
    /// the page cache), so every allocated page is mapped there and counted once. `None`
    /// otherwise.
    pub fn exact_counts(
        &self,
        offset: u64,
        len: u64,
        allocated: u64,
    ) -> Option<BTreeMap<u32, u64>> {
        let spans = self.vmas.iter().map(|v| (v.file_offset, v.len));
        if allocated == 0 || !mappings_fit(spans, offset, len) {
            return None;
        }
        let mut nodes: BTreeMap<u32, u64> = BTreeMap::new();
        for v in self
            .vmas
            .iter()
            .filter(|v| touches(v.file_offset, v.len, offset, len))
        {
            for (&n, &pages) in &v.nodes {
                *nodes.entry(n).or_default() += pages;
            }
        }
        (nodes.values().sum::<u64>() == allocated).then_some(nodes)
    }
}

/// Whether the file interval `[at, at+l)` shares a byte with `[offset, offset+len)`.
fn touches(at: u64, l: u64, offset: u64, len: u64) -> bool {
    at < offset.saturating_add(len) && at.saturating_add(l) > offset
}

/// Whether the mappings (file offset, length) that touch `[offset, offset+len)` all lie inside it
/// and no two share a file page, and there is at least one: then their page counts, if they add
/// up to the range's allocated pages, count each allocated page once.
fn mappings_fit(spans: impl Iterator<Item = (u64, u64)>, offset: u64, len: u64) -> bool {
    let Some(end) = offset.checked_add(len) else {
        return false;
    };
    let mut touching: Vec<(u64, u64)> = spans
        .filter(|&(at, l)| touches(at, l, offset, len))
        .collect();
    touching.sort_unstable();
    let mut covered_to = offset;
    for &(at, l) in &touching {
        if at < covered_to || at.saturating_add(l) > end {
            return false;
        }
        covered_to = at + l;
    }
    !touching.is_empty()
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The runs of allocated pages as `(offset, len)` in the file.
fn runs(map: &[bool], offset: u64, page: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < map.len() {
        if !map[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < map.len() && map[i] {
            i += 1;
        }
        out.push((offset + start as u64 * page, (i - start) as u64 * page));
    }
    out
}

/// The `N<node>=<pages>` fields of one numa_maps line.
fn parse_numa_maps_line(line: &str) -> BTreeMap<u32, u64> {
    line.split_ascii_whitespace()
        .filter_map(|f| {
            let (k, v) = f.strip_prefix('N')?.split_once('=')?;
            Some((k.parse().ok()?, v.parse().ok()?))
        })
        .filter(|(_, pages)| *pages > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn numa_maps_fields_are_parsed() {
        let l =
            "7f0000000000 bind:0 file=/memfd:x\\040(deleted) dirty=3 N0=2 N1=1 kernelpagesize_kB=4";
        assert_eq!(
            parse_numa_maps_line(l),
            BTreeMap::from([(0u32, 2u64), (1, 1)])
        );
    }

    /// Only shared mappings of the file named by (st_dev, st_ino) are taken from a maps text.
    #[test]
    fn maps_lines_of_the_file_are_found_by_device_and_inode() {
        let dev = libc::makedev(0, 1);
        let maps = "\
7f0000000000-7f0000400000 rw-s 00000000 00:01 1234                       /memfd:a (deleted)
7f0000400000-7f0000800000 rw-s 00400000 00:01 1234                       /memfd:a (deleted)
7f0000800000-7f0000c00000 rw-p 00000000 00:01 1234                       /memfd:a (deleted)
7f0000c00000-7f0001000000 rw-s 00000000 00:01 999                        /memfd:b (deleted)
7f0001000000-7f0001400000 rw-s 00000000 08:01 1234                       /some file
7f0001400000-7f0001800000 r--s 00200000 00:01 1234                       /memfd:a with spaces (deleted)";
        assert_eq!(
            shared_mappings_of(maps, (dev, 1234)),
            vec![
                (0x7f00_0000_0000, 0x7f00_0040_0000, 0),
                (0x7f00_0040_0000, 0x7f00_0080_0000, 0x40_0000),
                (0x7f00_0140_0000, 0x7f00_0180_0000, 0x20_0000),
            ]
        );
    }

    /// A holder's counts are used only when its mappings that touch the range lie inside it,
    /// do not overlap, and map exactly the allocated pages.
    #[test]
    fn holder_counts_are_used_only_where_exact() {
        let vma = |start: u64, file_offset: u64, len: u64, pages: u64| HolderVma {
            start,
            file_offset,
            len,
            nodes: BTreeMap::from([(1u32, pages)]),
        };
        let page = 4096;
        let h = |vmas| HolderMappings { pid: 7, vmas };
        let whole = h(vec![vma(0x1000_0000, 0, 64 * page, 64)]);
        assert_eq!(
            whole.exact_counts(0, 64 * page, 64),
            Some(BTreeMap::from([(1, 64)]))
        );
        assert_eq!(
            whole.exact_counts(0, 64 * page, 65),
            None,
            "a page not mapped"
        );
        assert_eq!(
            whole.exact_counts(0, 32 * page, 32),
            None,
            "reaches past the range"
        );
        assert_eq!(
            whole.exact_counts(64 * page, 64 * page, 0),
            None,
            "nothing allocated"
        );
        let two = h(vec![
            vma(0x2000_0000, 32 * page, 32 * page, 30),
            vma(0x1000_0000, 0, 32 * page, 2),
            // Outside the range asked for below: ignored.
            vma(0x3000_0000, 128 * page, 8 * page, 8),
        ]);
        assert_eq!(
            two.exact_counts(0, 64 * page, 32),
            Some(BTreeMap::from([(1, 32)]))
        );
        assert_eq!(
            two.exact_counts(0, 128 * page, 32),
            Some(BTreeMap::from([(1, 32)]))
        );
        let overlapping = h(vec![
            vma(0x1000_0000, 0, 32 * page, 16),
            vma(0x2000_0000, 16 * page, 48 * page, 16),
        ]);
        assert_eq!(overlapping.exact_counts(0, 64 * page, 32), None, "overlap");
    }

    /// This process maps a file: its maps and numa_maps give the mapping and its pages; a
    /// different file, or pages mapped only in part, are told apart.
    #[test]
    fn holder_mappings_of_this_process() {
        let page = super::super::page_size();
        let size = 64 * page;
        let fd = super::super::create_memfd("holder-test", size, None).unwrap();
        let other = super::super::create_memfd("holder-other", size, None).unwrap();
        let id = super::super::fd_file_id(fd.as_fd()).unwrap();
        let me = std::process::id() as i32;
        assert!(
            holder_mappings(me, id, &[(0, size)])
                .unwrap()
                .vmas
                .is_empty(),
            "not mapped yet"
        );
        let w = Mapping::window(fd.as_fd(), 8 * page, 16 * page).unwrap();
        let _o = Mapping::window(other.as_fd(), 0, size).unwrap();
        super::super::fallocate(fd.as_fd(), 8 * page, 16 * page, false).unwrap();
        w.populate_read(8 * page, 10 * page).unwrap();
        let h = holder_mappings(me, id, &[(0, size)]).unwrap();
        assert_eq!(h.vmas.len(), 1, "{h:?}");
        let v = &h.vmas[0];
        assert_eq!(
            (v.start, v.file_offset, v.len),
            (w.guest_address(), 8 * page, 16 * page)
        );
        assert_eq!(v.nodes.values().sum::<u64>(), 10, "{h:?}");
        // No range it could count: numa_maps is not read, and nothing is returned.
        for ranges in [
            &[(0, 8 * page)][..],
            &[(0, 16 * page), (16 * page, 48 * page)],
        ] {
            let h = holder_mappings(me, id, ranges).unwrap();
            assert!(h.vmas.is_empty(), "{ranges:?}: {h:?}");
        }
        // 16 pages allocated, 10 mapped: the window counts instead.
        let c = count_nodes_held(fd.as_fd(), size, 0, size, page, Some(&h)).unwrap();
        assert_eq!((c.counted_from, c.nodes.values().sum::<u64>()), (None, 16));
        w.populate_read(8 * page, 16 * page).unwrap();
        let h = holder_mappings(me, id, &[(0, size)]).unwrap();
        let c = count_nodes_held(fd.as_fd(), size, 0, size, page, Some(&h)).unwrap();
        assert_eq!(
            (c.counted_from, c.nodes.values().sum::<u64>()),
            (Some(me), 16)
        );
        assert_eq!(c.not_present, 48);
        assert_eq!(
            c.nodes,
            count_nodes(fd.as_fd(), size, 0, size, page).unwrap().nodes
        );
        // Every page of [8, 24) is mapped in the holder: counted from it without reading the
        // page cache (an O_PATH descriptor, which cachestat refuses, still counts).
        let path: std::os::fd::OwnedFd = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .into();
        assert!(count_nodes(path.as_fd(), size, 8 * page, 16 * page, page).is_err());
        let c = count_nodes_held(path.as_fd(), size, 8 * page, 16 * page, page, Some(&h)).unwrap();
        assert_eq!(
            (c.counted_from, c.nodes.values().sum::<u64>(), c.not_present),
            (Some(me), 16, 0)
        );
    }

    /// Allocated pages are counted exactly, holes are counted as not present and stay holes, and
    /// the agent-side count matches what move_pages reports.
    #[test]
    fn counts_allocated_pages_and_allocates_none() {
        let page = super::super::page_size();
        let size = 64 * page;
        let fd = super::super::create_memfd("residency-test", size, None).unwrap();
        super::super::fallocate(fd.as_fd(), page, 3 * page, false).unwrap();
        super::super::fallocate(fd.as_fd(), 40 * page, 10 * page, false).unwrap();
        let c = count_nodes(fd.as_fd(), size, 0, size, page).unwrap();
        assert_eq!(c.nodes.values().sum::<u64>(), 13, "{c:?}");
        assert_eq!((c.not_present, c.unknown), (51, 0), "{c:?}");
        assert_eq!(
            super::super::files::cached_pages(fd.as_fd(), 0, size).unwrap(),
            13,
            "counting allocated nothing"
        );
        // A sub-range, starting inside a run.
        let c = count_nodes(fd.as_fd(), size, 2 * page, 40 * page, page).unwrap();
        assert_eq!(c.nodes.values().sum::<u64>(), 2 + 2, "{c:?}");
        assert_eq!(c.not_present, 36, "{c:?}");
        // The count (move_pages) agrees with the kernel's own walk of a mapping that maps the
        // run: this process's numa_maps line for it.
        let w = Mapping::window(fd.as_fd(), 40 * page, 10 * page).unwrap();
        w.populate_read(40 * page, 10 * page).unwrap();
        let id = super::super::fd_file_id(fd.as_fd()).unwrap();
        let me = std::process::id() as i32;
        let by_numa_maps = holder_mappings(me, id, &[(40 * page, 10 * page)]).unwrap();
        assert_eq!(by_numa_maps.vmas.len(), 1, "{by_numa_maps:?}");
        let c = count_nodes(fd.as_fd(), size, 40 * page, 10 * page, page).unwrap();
        assert_eq!(c.nodes, by_numa_maps.vmas[0].nodes);
    }

    /// Pages of `[offset, offset+len)` mapped in `m` now (move_pages answers a node).
    fn mapped_in(m: &Mapping, offset: u64, len: u64, page: u64) -> usize {
        m.page_nodes(offset, len, page)
            .unwrap()
            .iter()
            .filter(|s| **s >= 0)
            .count()
    }

    /// The census counts exactly what is allocated, keeps what it faulted mapped (so a second
    /// count faults nothing and asks the page cache nothing), follows punched holes and new
    /// pages, allocates nothing, and with `keep` false leaves the mapping as it found it.
    #[test]
    fn census_counts_keeps_its_pages_and_follows_changes() {
        let page = super::super::page_size();
        let size = 64 * page;
        let fd = super::super::create_memfd("census-test", size, None).unwrap();
        super::super::fallocate(fd.as_fd(), page, 3 * page, false).unwrap();
        super::super::fallocate(fd.as_fd(), 40 * page, 10 * page, false).unwrap();
        let census = Mapping::new(fd.as_fd(), size).unwrap();
        let mut runs = CensusRuns::default();
        let count = |runs: &mut CensusRuns, keep| {
            count_nodes_census(fd.as_fd(), &census, runs, (size, 0, size, page), None, keep)
                .unwrap()
        };
        // Not kept: counted, and nothing left mapped or recorded.
        let c = count(&mut runs, false);
        assert_eq!(
            (c.nodes.values().sum::<u64>(), c.not_present, c.unknown),
            (13, 51, 0)
        );
        assert_eq!((mapped_in(&census, 0, size, page), runs.bytes()), (0, 0));
        // Kept: the 13 allocated pages stay mapped, in two recorded runs, and nothing else.
        let c = count(&mut runs, true);
        assert_eq!((c.nodes.values().sum::<u64>(), c.not_present), (13, 51));
        assert_eq!(mapped_in(&census, 0, size, page), 13);
        assert_eq!(
            runs,
            CensusRuns(vec![(page, 3 * page), (40 * page, 10 * page)])
        );
        assert_eq!(
            super::super::files::cached_pages(fd.as_fd(), 0, size).unwrap(),
            13,
            "counting allocated nothing"
        );
        // Counted again from what is mapped: the same answer, the same pages mapped. A file
        // descriptor the page cache cannot be read through still counts the recorded runs (an
        // O_PATH one: cachestat refuses it), so the recorded pages were not read from it.
        let path: std::os::fd::OwnedFd = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .into();
        let c = count_nodes_census(
            path.as_fd(),
            &census,
            &mut runs,
            (size, 40 * page, 10 * page, page),
            None,
            true,
        )
        .unwrap();
        assert_eq!(
            (c.nodes.values().sum::<u64>(), c.not_present),
            (10, 0),
            "{c:?}"
        );
        // A punched page leaves the mapping; a new one is found and faulted.
        super::super::fallocate(fd.as_fd(), 41 * page, page, true).unwrap();
        super::super::fallocate(fd.as_fd(), 60 * page, 2 * page, false).unwrap();
        let c = count(&mut runs, true);
        assert_eq!(
            (c.nodes.values().sum::<u64>(), c.not_present, c.unknown),
            (14, 50, 0)
        );
        assert_eq!(mapped_in(&census, 0, size, page), 14);
        // A sub-range starting inside a run: pages 2 and 3, and 40 (41 was punched).
        let c = count_nodes_census(
            fd.as_fd(),
            &census,
            &mut runs,
            (size, 2 * page, 40 * page, page),
            None,
            true,
        )
        .unwrap();
        assert_eq!(
            (c.nodes.values().sum::<u64>(), c.not_present),
            (2 + 1, 37),
            "{c:?}"
        );
    }

    /// Recorded intervals merge, and a range splits into recorded and unrecorded pieces.
    #[test]
    fn census_runs_merge_and_split() {
        let mut r = CensusRuns::default();
        r.insert([(10, 5), (30, 10)]);
        r.insert([(15, 5), (50, 1)]);
        assert_eq!(r, CensusRuns(vec![(10, 10), (30, 10), (50, 1)]));
        assert_eq!(r.bytes(), 21);
        assert_eq!(
            r.split(0, 45),
            vec![
                (0, 10, false),
                (10, 10, true),
                (20, 10, false),
                (30, 10, true),
                (40, 5, false)
            ]
        );
        assert_eq!(r.split(12, 3), vec![(12, 3, true)]);
        r.clear();
        assert_eq!(r.split(0, 8), vec![(0, 8, false)]);
    }
}

//! memplace-test-standin: stand-in VMM processes for the server's integration tests (not a
//! product binary). The tests start it by path, as a sibling of `memplaced` in the target
//! directory, so it must be built with the workspace (`cargo build --workspace`).
//!
//! Subcommands:
//!
//! * `handoff-vmm` (server/tests/handoff_recovery.rs): creates a file of its own, `memfd` or
//!   `guest_memfd` (then on its own KVM VM, with memslot 0 bound to it), adopts it into the agent
//!   as VM/NAME, and then obeys `write SEED LEN` / `check SEED LEN` on stdin. Configured through
//!   the environment: `MEMPLACE_TEST_VMM` (backend), `MEMPLACE_TEST_VMM_SOCKET` (handoff socket),
//!   `MEMPLACE_TEST_VMM_REGION` (VM/NAME), `MEMPLACE_TEST_VMM_TOKEN`, `MEMPLACE_TEST_VMM_SIZE`.
//!   Prints `vmm: memslot bound` (guest_memfd), `vmm: adopted NAME ino INO`, `vmm: written`,
//!   `vmm: pattern ok|BAD`.
//! * `gmem-vmm` (server/tests/vmm_attach.rs): a KVM VM of its own with two guest_memfds, the
//!   first bound to memslot 0 through its mapping, the second only held as an fd; and a memfd it
//!   maps shared and holds no fd for. It writes a pattern into all three, prints `vmm: ready`,
//!   and answers `check` on stdin with `vmm: pattern ok` or `vmm: pattern BAD`.
//!
//! Any failure panics (non-zero exit), which the calling test sees as the process ending.
#![forbid(unsafe_code)]

use memplace_client::handoff::Handoff;
use memplace_client::pb;
use memplace_sys::{self as kernel, GuestMemfdVm, Mapping};
use std::os::fd::AsFd;

const PAGE: u64 = 4096;

fn main() {
    let cmd = std::env::args().nth(1);
    match cmd.as_deref() {
        Some("handoff-vmm") => handoff_vmm(),
        Some("gmem-vmm") => gmem_vmm(),
        other => {
            eprintln!("usage: memplace-test-standin handoff-vmm|gmem-vmm (got {other:?})");
            std::process::exit(2);
        }
    }
}

/// The byte written at the start of each page (as `memplacectl hold --pattern` does).
fn pattern_byte(seed: u64, off: u64) -> u8 {
    ((off / PAGE).wrapping_mul(31).wrapping_add(seed) & 0xff) as u8
}

fn handoff_vmm() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} must be set"));
    let backend = var("MEMPLACE_TEST_VMM");
    let socket = var("MEMPLACE_TEST_VMM_SOCKET");
    let region = var("MEMPLACE_TEST_VMM_REGION");
    let (vm_id, name) = region.split_once('/').expect("VM/NAME");
    let token = var("MEMPLACE_TEST_VMM_TOKEN");
    let size: u64 = var("MEMPLACE_TEST_VMM_SIZE").parse().expect("size");
    let (fd, vm, pb_backend) = if backend == "guest_memfd" {
        let vm = GuestMemfdVm::create().expect("creating a KVM VM in the VMM");
        let flags =
            kernel::files::GUEST_MEMFD_FLAG_MMAP | kernel::files::GUEST_MEMFD_FLAG_INIT_SHARED;
        let fd = vm
            .create_guest_memfd(size, flags)
            .expect("KVM_CREATE_GUEST_MEMFD");
        (fd, Some(vm), pb::Backend::GuestMemfd)
    } else {
        let fd = kernel::create_memfd(&region, size, None).expect("memfd_create");
        (fd, None, pb::Backend::Memfd)
    };
    let map = std::sync::Arc::new(Mapping::new(fd.as_fd(), size).expect("mmap"));
    if let Some(vm) = &vm {
        vm.bind_memslot(0, 0, map.clone(), fd.as_fd())
            .expect("binding memslot 0 of the VMM's own VM to its guest_memfd");
        println!("vmm: memslot bound");
    }
    let conn = Handoff::connect(&socket).expect("connecting to the handoff socket");
    let r = conn
        .adopt(vm_id, name, pb_backend, size, &token, fd.as_fd())
        .expect("adopt");
    let (_, ino) = kernel::fd_file_id(fd.as_fd()).expect("fstat");
    println!("vmm: adopted {} ino {ino}", r.name);
    for line in std::io::stdin().lines().map_while(Result::ok) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (seed, len): (u64, u64) = match words.as_slice() {
            [_, s, l] => (s.parse().expect("seed"), l.parse().expect("len")),
            _ => panic!("bad command {line:?}"),
        };
        match words[0] {
            "write" => {
                for off in (0..len).step_by(PAGE as usize) {
                    map.write(off, &[pattern_byte(seed, off)]).expect("write");
                }
                println!("vmm: written");
            }
            "check" => {
                let good = (0..len).step_by(PAGE as usize).all(|off| {
                    let mut b = [0u8];
                    map.read(off, &mut b).is_ok() && b[0] == pattern_byte(seed, off)
                });
                println!("vmm: pattern {}", if good { "ok" } else { "BAD" });
            }
            other => panic!("unknown command {other}"),
        }
    }
    // The VM goes before the mapping its memslot points into.
    drop(vm);
    drop(map);
}

const GMEM: u64 = 4 << 20;

fn gmem_vmm() {
    let vm = GuestMemfdVm::create().expect("creating a KVM VM in the VMM");
    let flags = kernel::files::GUEST_MEMFD_FLAG_MMAP | kernel::files::GUEST_MEMFD_FLAG_INIT_SHARED;
    let g0 = vm.create_guest_memfd(GMEM, flags).expect("guest_memfd 0");
    let g1 = vm.create_guest_memfd(GMEM, flags).expect("guest_memfd 1");
    let m0 = std::sync::Arc::new(Mapping::new(g0.as_fd(), GMEM).expect("mmap guest_memfd 0"));
    vm.bind_memslot(0, 0, m0.clone(), g0.as_fd())
        .expect("binding memslot 0 to guest_memfd 0");
    let mf = kernel::create_memfd("weird name/1", GMEM, None).expect("memfd_create");
    let mm = Mapping::new(mf.as_fd(), GMEM).expect("mmap memfd");
    drop(mf); // mapped, no fd
    let maps = [(&*m0, 1u64), (&mm, 2u64)];
    for (m, seed) in maps {
        for off in (0..GMEM).step_by(PAGE as usize) {
            m.write(off, &[pattern_byte(seed, off)]).expect("write");
        }
    }
    println!("vmm: ready");
    for line in std::io::stdin().lines().map_while(Result::ok) {
        assert_eq!(line.trim(), "check", "unknown command");
        let good = maps.iter().all(|(m, seed)| {
            (0..GMEM).step_by(PAGE as usize).all(|off| {
                let mut b = [0u8];
                m.read(off, &mut b).is_ok() && b[0] == pattern_byte(*seed, off)
            })
        });
        println!("vmm: pattern {}", if good { "ok" } else { "BAD" });
    }
    // The VM goes before the mapping its memslot points into.
    drop(g1);
    drop(vm);
    drop(m0);
}

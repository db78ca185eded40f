//! memplace-test-vmm: the smallest VMM that runs a real guest on guest_memfd memory placed by
//! memplace. It is what the 7.x NUMA guest test runs (server/tests/numa/scenario.sh, `vmm_case`)
//! and what the README's guest_memfd section shows.
//!
//! The flow of any VMM that backs guest RAM with guest_memfd:
//!   1. create its KVM VM and a guest_memfd on it (MMAP|INIT_SHARED), and bind a memslot to it:
//!      a guest_memfd binds only to the VM that created it, so the VMM must make it itself;
//!   2. hand the file to the agent with `adopt` on the handoff socket (the agent now holds it, and
//!      takes it back from this process with pidfd_getfd after an agent restart);
//!   3. let the placement be set (SetPolicy) **before** the guest first touches the memory:
//!      guest_memfd pages cannot be migrated;
//!   4. run the vCPU.
//!
//! Here the "guest" is 32-bit protected-mode code (flat segments, no paging) in a separate small
//! code memslot at guest-physical 0. It writes a 4-byte value (seed + page index) at the start of
//! every page of its span of the RAM memslot (guest-physical 1 MiB on, backed by the adopted
//! guest_memfd) and halts. Each SIGUSR1 runs the next pass (`--pass BYTES`, in order, each one
//! continuing where the last stopped); SIGTERM ends the VMM. Every page a pass writes is first
//! touched by the guest's own stores, through KVM's guest_memfd fault path in the vCPU thread.
//!
//! Usage: memplace-test-vmm --handoff-socket PATH --token TOKEN VM NAME --size SIZE
//!        [--pass SIZE]... [--seed N]
//! Prints (stdout, one line each):
//!   `vmm: adopted VM/NAME gmem DEV:INO size BYTES pid PID`
//!   `vmm: pass N wrote PAGES pages at offset OFFSET: guest halted, pattern ok`
//! and exits non-zero with `vmm: error ...` on any failure (a wrong pattern included).
#![forbid(unsafe_code)]

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuExit;
use memplace_client::handoff::Handoff;
use memplace_client::pb;
use memplace_sys::files::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use memplace_sys::{self as kernel, GuestMemfdVm, Mapping};
use nix::sys::signal::{SigSet, Signal};
use std::io::Write;
use std::os::fd::AsFd;

const PAGE: u64 = 4096;
/// Guest-physical address of the code memslot (slot 0, one page).
const CODE_GPA: u64 = 0;
/// Guest-physical address of the RAM memslot (slot 1, the adopted guest_memfd).
const RAM_GPA: u64 = 1 << 20;

/// The guest, 32-bit code entered with EDI = first address, ECX = pages (> 0), EAX = value:
///   again: mov [edi], eax      89 07
///          add edi, 4096       81 c7 00 10 00 00
///          inc eax             40
///          dec ecx             49
///          jnz again           75 f4
///          hlt                 f4
const GUEST_CODE: [u8; 13] = [
    0x89, 0x07, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0x40, 0x49, 0x75, 0xf4, 0xf4,
];

struct Args {
    socket: String,
    token: String,
    vm: String,
    name: String,
    size: u64,
    passes: Vec<u64>,
    seed: u32,
}

fn main() {
    if let Err(e) = run() {
        println!("vmm: error {e}");
        std::process::exit(1);
    }
}

fn say(line: String) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    // Signals are taken with sigwait, so block them before anything else.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGUSR1);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;

    // 1. The VM, its guest_memfd and the two memslots.
    let vm = GuestMemfdVm::create().map_err(|e| format!("creating a KVM VM: {e}"))?;
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let ram = vm
        .create_guest_memfd(args.size, flags)
        .map_err(|e| format!("KVM_CREATE_GUEST_MEMFD ({} bytes): {e}", args.size))?;
    let ram_map = std::sync::Arc::new(
        Mapping::new(ram.as_fd(), args.size).map_err(|e| format!("mmap: {e}"))?,
    );
    vm.bind_memslot(1, RAM_GPA, ram_map.clone(), ram.as_fd())
        .map_err(|e| format!("binding memslot 1 to the guest_memfd: {e}"))?;
    // The code lives in a guest_memfd of its own, not adopted: the RAM file's pages are all the
    // guest's stores.
    let code = vm
        .create_guest_memfd(PAGE, flags)
        .map_err(|e| format!("KVM_CREATE_GUEST_MEMFD (code): {e}"))?;
    let code_map = std::sync::Arc::new(
        Mapping::new(code.as_fd(), PAGE).map_err(|e| format!("mmap (code): {e}"))?,
    );
    code_map
        .write(0, &GUEST_CODE)
        .map_err(|e| format!("writing the guest code: {e}"))?;
    vm.bind_memslot(0, CODE_GPA, code_map.clone(), code.as_fd())
        .map_err(|e| format!("binding memslot 0 to the code: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    flat_protected_mode(&vcpu)?;

    // 2. Adopt: the agent creates region VM/NAME for this file and holds it.
    let conn = Handoff::connect(&args.socket).map_err(|e| format!("handoff socket: {e}"))?;
    let region = conn
        .adopt(
            &args.vm,
            &args.name,
            pb::Backend::GuestMemfd,
            args.size,
            &args.token,
            ram.as_fd(),
        )
        .map_err(|e| format!("adopt: {e}"))?;
    drop(conn);
    let (dev, ino) = kernel::fd_file_id(ram.as_fd()).map_err(|e| format!("fstat: {e}"))?;
    say(format!(
        "vmm: adopted {}/{} gmem {dev}:{ino} size {} pid {}",
        region.vm_id,
        region.name,
        args.size,
        std::process::id()
    ));

    // 3. and 4.: each SIGUSR1 runs the next pass, after the caller has set the placement.
    let mut offset = 0u64;
    let mut pass = 0usize;
    loop {
        let sig = signals.wait().map_err(|e| format!("sigwait: {e}"))?;
        if sig == Signal::SIGTERM {
            break;
        }
        let Some(&len) = args.passes.get(pass) else {
            say(format!("vmm: error no pass {} was asked for", pass + 1));
            continue;
        };
        pass += 1;
        let pages = len / PAGE;
        let first = offset / PAGE;
        let value = args.seed.wrapping_add(first as u32);
        run_guest(&mut vcpu, RAM_GPA + offset, pages, value)?;
        check_pattern(&ram_map, offset, pages, value)?;
        say(format!(
            "vmm: pass {pass} wrote {pages} pages at offset {offset}: guest halted, pattern ok"
        ));
        offset += len;
    }
    // The VM goes before the mappings its memslots point into.
    drop(vcpu);
    drop(vm);
    drop(ram_map);
    drop(code_map);
    Ok(())
}

/// 32-bit protected mode with flat 4 GiB code and data segments and paging off.
fn flat_protected_mode(vcpu: &kvm_ioctls::VcpuFd) -> Result<(), String> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(0x08, 0xb); // execute/read, accessed
    let data = seg(0x10, 0x3); // read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.cr0 |= 1; // PE
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))
}

/// Runs the guest code once over `pages` pages from guest-physical `gpa`, until it halts.
fn run_guest(
    vcpu: &mut kvm_ioctls::VcpuFd,
    gpa: u64,
    pages: u64,
    value: u32,
) -> Result<(), String> {
    if pages == 0 {
        return Err("a pass of 0 pages".into());
    }
    let regs = kvm_regs {
        rip: CODE_GPA,
        rdi: gpa,
        rcx: pages,
        rax: u64::from(value),
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(exit) => {
                let exit = format!("{exit:?}");
                let regs = vcpu.get_regs().unwrap_or_default();
                return Err(format!(
                    "unexpected vCPU exit {exit} at rip {:#x}, rdi {:#x}, rcx {}",
                    regs.rip, regs.rdi, regs.rcx
                ));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
    let regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    if regs.rcx != 0 || regs.rdi != gpa + pages * PAGE {
        return Err(format!(
            "the guest halted early: rcx {} rdi {:#x}, want 0 and {:#x}",
            regs.rcx,
            regs.rdi,
            gpa + pages * PAGE
        ));
    }
    Ok(())
}

/// Reads back through this process's mapping what the guest wrote: value + i at page i.
fn check_pattern(map: &Mapping, offset: u64, pages: u64, value: u32) -> Result<(), String> {
    for i in 0..pages {
        let mut b = [0u8; 4];
        map.read(offset + i * PAGE, &mut b)
            .map_err(|e| format!("reading page {i}: {e}"))?;
        let want = value.wrapping_add(i as u32);
        let got = u32::from_le_bytes(b);
        if got != want {
            return Err(format!(
                "page {} holds {got:#x}, the guest should have written {want:#x}",
                offset / PAGE + i
            ));
        }
    }
    Ok(())
}

fn parse_args() -> Result<Args, String> {
    let usage = "usage: memplace-test-vmm --handoff-socket PATH --token TOKEN VM NAME --size SIZE \
                 [--pass SIZE]... [--seed N]";
    let mut socket = std::env::var("MEMPLACE_HANDOFF_SOCKET").ok();
    let (mut token, mut size, mut seed) = (None, None, 0x6d70_0000u32);
    let mut passes = Vec::new();
    let mut positional = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{a} needs a value; {usage}"))
        };
        match a.as_str() {
            "--handoff-socket" => socket = Some(value()?),
            "--token" => token = Some(value()?),
            "--size" => size = Some(parse_size(&value()?)?),
            "--pass" => passes.push(parse_size(&value()?)?),
            "--seed" => {
                seed = value()?
                    .parse()
                    .map_err(|_| "--seed: a number".to_string())?
            }
            "-h" | "--help" => return Err(usage.into()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}; {usage}")),
            _ => positional.push(a),
        }
    }
    let [vm, name] = <[String; 2]>::try_from(positional).map_err(|_| usage.to_string())?;
    let size = size.ok_or(usage)?;
    if passes.is_empty() {
        passes.push(size);
    }
    if passes.iter().sum::<u64>() > size {
        return Err(format!(
            "the passes ({passes:?}) add up to more than --size {size}"
        ));
    }
    Ok(Args {
        socket: socket.ok_or(usage)?,
        token: token.ok_or(usage)?,
        vm,
        name,
        size,
        passes,
        seed,
    })
}

/// A byte count with an optional K, M or G suffix, a multiple of the page size.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} too large"))?;
    if bytes == 0 || bytes % PAGE != 0 {
        return Err(format!("size {s:?} must be a positive multiple of {PAGE}"));
    }
    Ok(bytes)
}

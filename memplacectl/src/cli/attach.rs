//! `memplacectl attach VM_ID --pid PID`: bring a running VMM's guest memory under memplace.

use super::Output;
use super::render::{self, enum_name, human};
use clap::Args;
use memplace_client::{Client, ClientError};

/// Arguments of `attach`.
#[derive(Args, Debug)]
#[command(after_help = "\
Every memfd the process maps shared or holds as an fd, and every guest_memfd it holds, becomes a \
region of VM_ID (backend and size from the file). A memfd is named after the QEMU memory backend \
it is (its id on QEMU's command line, with the guest NUMA cell it backs) when the kernel proves \
it: the only backend and the only memfd of its size, mapped whole. Otherwise it is named after \
the memfd, made valid and unique; guest_memfd regions are gmem0, gmem1, ... Each region's intent \
starts as the policy the kernel shows on the file (QEMU's host-nodes=/policy= are kept), so \
attaching changes no placement; SetPolicy changes it later. The process is recorded as the \
holder, so an agent restart takes the files back from it, and when it exits (and no other \
process holds the file) the memory is released. Attaching again is harmless: a file that \
already is a region of VM_ID is that region again. Needs an admin caller.

QEMU: start it with `-object memory-backend-memfd,id=m0,size=SIZE,share=on -machine \
memory-backend=m0`. Plain -m RAM is anonymous and share=off maps the memfd privately: neither can \
be attached.

Errors (exit code): 13 INVALID_ARGUMENT for pid 1, the agent's own pid, a thread id or a bad VM \
id; 15 NOT_FOUND when no process has that pid (or it has exited); 19 FAILED_PRECONDITION when \
the process has no shared guest memory (not a VMM, or a VMM without share=on), the message says \
what to change; 17 PERMISSION_DENIED for a viewer, or when the agent may not take the process's \
fds (CAP_SYS_PTRACE). Nothing is changed when attach fails.")]
pub struct AttachArgs {
    /// VM id the regions belong to.
    pub vm: String,
    /// The running VMM's process id.
    #[arg(long)]
    pub pid: i32,
}

/// Runs `attach`.
pub async fn attach(c: &mut Client, a: &AttachArgs, out: Output) -> Result<(), ClientError> {
    let r = c.attach_process(&a.vm, a.pid).await?;
    #[derive(serde::Serialize)]
    struct Attached<'a> {
        regions: &'a [memplace_client::pb::Region],
    }
    let v = Attached {
        regions: &r.regions,
    };
    render::print(out, &v, || {
        for x in &r.regions {
            println!(
                "{}/{}  {}  {}  held by pid {}",
                x.vm_id,
                x.name,
                enum_name(x.backend().as_str_name(), "BACKEND_"),
                human(x.size_bytes),
                x.holder_pid
            );
        }
    });
    Ok(())
}

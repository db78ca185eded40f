//! `memplaced`: the memplace agent. All work is in the library; see `memplace_server::app`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // The populate helper child: joins a memory cgroup and allocates, then exits.
    if args.get(1).map(String::as_str) == Some("__populate-worker") {
        return std::process::ExitCode::from(
            memplace_server::engine::populate_child_main(&args[2..]).clamp(0, 255) as u8,
        );
    }
    memplace_server::app::main()
}

//! Hundreds of generated invalid requests against the real agent, across every RPC, raw
//! (truncated or garbage) protobuf on the wire, and the handoff socket. Each must get the right
//! code and a message that says what is wrong, change nothing (ListRegions with the kernel's
//! observed policies, and the row counts read by the sqlite3 CLI), and crash nothing.
//! core_agent.rs keeps a hand-written table of 30+; this suite generates combinations.

mod common;

use common::procfs::memfd_allocated_bytes;
use common::sqlite;
use common::wait;
use common::{AgentProc, MIB, policy, whole};
use memplace_client::handoff::Handoff;
use memplace_client::{Client, pb};
use prost::Message;
use std::os::fd::AsFd;
use tonic::Code;

const SIZE: u64 = 16 * MIB;

/// Names that must be refused wherever a vm_id or region name goes.
fn bad_names() -> Vec<String> {
    vec![
        String::new(),
        "a b".into(),
        "a/b".into(),
        "../etc".into(),
        "a".repeat(64),
        "x".repeat(4000),
        "räm".into(),
        "💥".into(),
        "nul\0byte".into(),
        "line\nbreak".into(),
        "tab\t".into(),
        "semi;colon".into(),
        "back\\slash".into(),
        "\u{202e}rtl".into(),
    ]
}

/// Spans that must be refused on a 16 MiB region of 4 KiB pages.
fn bad_spans() -> Vec<(u64, u64)> {
    vec![
        (1, 0),
        (0, 1),
        (4095, 4096),
        (0, 4097),
        (SIZE, 0),
        (SIZE, 4096),
        (SIZE - 4096, 8192),
        (12 * MIB, 8 * MIB),
        (u64::MAX - 4095, 0),
        (u64::MAX - 4095, 8192),
        (0, u64::MAX - 4095),
        (8 * MIB, u64::MAX - 4095),
        (u64::MAX, u64::MAX),
        (1 << 63, 1 << 63),
    ]
}

/// Policies that must be refused on a one-node machine.
fn bad_policies() -> Vec<(String, pb::Policy)> {
    use pb::PolicyMode as M;
    let mut out = Vec::new();
    for mode in [0, 8, 99, -1, i32::MIN, i32::MAX] {
        out.push((
            format!("mode {mode}"),
            pb::Policy {
                mode,
                ..policy(M::Bind, &[0])
            },
        ));
    }
    let with_nodes = [
        M::Bind,
        M::Preferred,
        M::Interleave,
        M::PreferredMany,
        M::WeightedInterleave,
    ];
    let bad_node_lists: Vec<(&str, Vec<u32>)> = vec![
        ("no nodes", vec![]),
        ("node 1024", vec![1024]),
        ("node u32::MAX", vec![u32::MAX]),
        ("0 and 1024", vec![0, 1024]),
        ("5000 nodes", (0..5000).collect()),
        ("offline node 1000", vec![1000]),
    ];
    for m in with_nodes {
        for (what, nodes) in &bad_node_lists {
            out.push((format!("{m:?} {what}"), policy(m, nodes)));
        }
        out.push((
            format!("{m:?} static+relative"),
            pb::Policy {
                static_nodes: true,
                relative_nodes: true,
                ..policy(m, &[0])
            },
        ));
    }
    for m in [M::Default, M::Local] {
        out.push((format!("{m:?} with a node"), policy(m, &[0])));
        out.push((
            format!("{m:?} static"),
            pb::Policy {
                static_nodes: true,
                ..policy(m, &[])
            },
        ));
        out.push((
            format!("{m:?} relative"),
            pb::Policy {
                relative_nodes: true,
                ..policy(m, &[])
            },
        ));
    }
    out.push((
        "preferred with two nodes".into(),
        policy(M::Preferred, &[0, 1]),
    ));
    out
}

fn bad_request_ids() -> Vec<String> {
    vec![
        "a b".into(),
        "x".repeat(129),
        "é".into(),
        "tab\t".into(),
        "\0".into(),
    ]
}

/// One invalid call and the code it must get.
struct Case {
    what: String,
    code: Code,
    call: Call,
}

enum Call {
    Create(pb::CreateRegionRequest),
    Get(pb::GetRegionRequest),
    List(pb::ListRegionsRequest),
    Delete(pb::DeleteRegionRequest),
    SetPolicy(pb::SetPolicyRequest),
    Populate(pb::PopulateRequest),
    Placement(pb::GetPlacementRequest),
    Reconcile(pb::ReconcileRequest),
    Watch(pb::WatchEventsRequest),
    /// Raw bytes as the body of a unary method.
    Raw(&'static str, Vec<u8>),
}

fn case(what: impl Into<String>, code: Code, call: Call) -> Case {
    Case {
        what: what.into(),
        code,
        call,
    }
}

fn cases() -> Vec<Case> {
    let inv = Code::InvalidArgument;
    let mut v = Vec::new();
    let create = pb::CreateRegionRequest {
        vm_id: "vm".into(),
        name: "new".into(),
        size_bytes: 8 * MIB,
        backend: pb::Backend::Memfd as i32,
        ..Default::default()
    };
    let set = pb::SetPolicyRequest {
        vm_id: "vm".into(),
        name: "r".into(),
        policy: Some(policy(pb::PolicyMode::Bind, &[0])),
        ..Default::default()
    };
    let populate = pb::PopulateRequest {
        vm_id: "vm".into(),
        name: "r".into(),
        threads: 1,
        ..Default::default()
    };
    let placement = pb::GetPlacementRequest {
        vm_id: "vm".into(),
        name: "r".into(),
        ..Default::default()
    };

    // Every bad name in every position of every RPC that takes one.
    for n in bad_names() {
        let short: String = n.chars().take(12).collect();
        for vm_pos in [true, false] {
            let (vm, name) = if vm_pos {
                (n.clone(), "r".to_string())
            } else {
                ("vm".to_string(), n.clone())
            };
            let pos = if vm_pos { "vm_id" } else { "name" };
            v.push(case(
                format!("create {pos} {short:?}"),
                inv,
                Call::Create(pb::CreateRegionRequest {
                    vm_id: vm.clone(),
                    name: name.clone(),
                    ..create.clone()
                }),
            ));
            v.push(case(
                format!("get {pos} {short:?}"),
                inv,
                Call::Get(pb::GetRegionRequest {
                    vm_id: vm.clone(),
                    name: name.clone(),
                    ..Default::default()
                }),
            ));
            v.push(case(
                format!("delete {pos} {short:?}"),
                inv,
                Call::Delete(pb::DeleteRegionRequest {
                    vm_id: vm.clone(),
                    name: name.clone(),
                    request_id: String::new(),
                }),
            ));
            v.push(case(
                format!("set {pos} {short:?}"),
                inv,
                Call::SetPolicy(pb::SetPolicyRequest {
                    vm_id: vm.clone(),
                    name: name.clone(),
                    ..set.clone()
                }),
            ));
            v.push(case(
                format!("populate {pos} {short:?}"),
                inv,
                Call::Populate(pb::PopulateRequest {
                    vm_id: vm.clone(),
                    name: name.clone(),
                    ..populate.clone()
                }),
            ));
            v.push(case(
                format!("placement {pos} {short:?}"),
                inv,
                Call::Placement(pb::GetPlacementRequest {
                    vm_id: vm.clone(),
                    name: name.clone(),
                    ..placement.clone()
                }),
            ));
        }
        if !n.is_empty() {
            // Empty means "all VMs" for these.
            v.push(case(
                format!("list {short:?}"),
                inv,
                Call::List(pb::ListRegionsRequest {
                    vm_id: n.clone(),
                    ..Default::default()
                }),
            ));
            v.push(case(
                format!("reconcile {short:?}"),
                inv,
                Call::Reconcile(pb::ReconcileRequest { vm_id: n.clone() }),
            ));
            v.push(case(
                format!("watch {short:?}"),
                inv,
                Call::Watch(pb::WatchEventsRequest {
                    vm_id: n.clone(),
                    no_follow: true,
                    ..Default::default()
                }),
            ));
        }
    }

    // Every bad span on every RPC that takes one.
    for (offset, length) in bad_spans() {
        let s = format!("offset {offset} length {length}");
        v.push(case(
            format!("set {s}"),
            inv,
            Call::SetPolicy(pb::SetPolicyRequest {
                offset,
                length,
                ..set.clone()
            }),
        ));
        v.push(case(
            format!("populate {s}"),
            inv,
            Call::Populate(pb::PopulateRequest {
                offset,
                length,
                ..populate.clone()
            }),
        ));
        v.push(case(
            format!("placement {s}"),
            inv,
            Call::Placement(pb::GetPlacementRequest {
                offset,
                length,
                ..placement.clone()
            }),
        ));
        v.push(case(
            format!("create with initial policy at {s}"),
            inv,
            Call::Create(pb::CreateRegionRequest {
                size_bytes: SIZE,
                policies: vec![pb::RangePolicy {
                    offset,
                    length,
                    policy: Some(policy(pb::PolicyMode::Bind, &[0])),
                }],
                ..create.clone()
            }),
        ));
    }

    // Every bad policy through SetPolicy and CreateRegion.
    for (what, p) in bad_policies() {
        v.push(case(
            format!("set {what}"),
            inv,
            Call::SetPolicy(pb::SetPolicyRequest {
                policy: Some(p.clone()),
                ..set.clone()
            }),
        ));
        v.push(case(
            format!("create with {what}"),
            inv,
            Call::Create(pb::CreateRegionRequest {
                policies: whole(p),
                ..create.clone()
            }),
        ));
    }

    // Sizes and backends.
    for backend in [pb::Backend::Memfd, pb::Backend::GuestMemfd] {
        for size in [
            0,
            1,
            4097,
            SIZE + 1,
            (1 << 40) + 4096,
            1 << 41,
            u64::MAX - 4095,
            u64::MAX,
        ] {
            v.push(case(
                format!("create {backend:?} size {size}"),
                inv,
                Call::Create(pb::CreateRegionRequest {
                    size_bytes: size,
                    backend: backend as i32,
                    ..create.clone()
                }),
            ));
        }
    }
    for backend in [0, 4, 99, -5, i32::MAX] {
        v.push(case(
            format!("create backend {backend}"),
            inv,
            Call::Create(pb::CreateRegionRequest {
                backend,
                ..create.clone()
            }),
        ));
    }
    for huge in [1, 4096, 2 * MIB + 1, 3 * MIB, u64::MAX] {
        v.push(case(
            format!("create hugetlb page size {huge}"),
            inv,
            Call::Create(pb::CreateRegionRequest {
                backend: pb::Backend::MemfdHugetlb as i32,
                hugepage_size_bytes: huge,
                ..create.clone()
            }),
        ));
    }
    v.push(case(
        "create: more initial policies than ranges allowed",
        Code::ResourceExhausted,
        Call::Create(pb::CreateRegionRequest {
            size_bytes: SIZE,
            policies: (0..300u64)
                .map(|i| pb::RangePolicy {
                    offset: i * 4096,
                    length: 4096,
                    policy: Some(policy(
                        if i % 2 == 0 {
                            pb::PolicyMode::Bind
                        } else {
                            pb::PolicyMode::Local
                        },
                        if i % 2 == 0 { &[0] } else { &[] },
                    )),
                })
                .collect(),
            ..create.clone()
        }),
    ));

    // Bad request ids on every mutation that takes one.
    for id in bad_request_ids() {
        v.push(case(
            format!("create request_id {id:?}"),
            inv,
            Call::Create(pb::CreateRegionRequest {
                request_id: id.clone(),
                ..create.clone()
            }),
        ));
        v.push(case(
            format!("set request_id {id:?}"),
            inv,
            Call::SetPolicy(pb::SetPolicyRequest {
                request_id: id.clone(),
                ..set.clone()
            }),
        ));
        v.push(case(
            format!("delete request_id {id:?}"),
            inv,
            Call::Delete(pb::DeleteRegionRequest {
                vm_id: "vm".into(),
                name: "r".into(),
                request_id: id.clone(),
            }),
        ));
    }

    // Populate: absurd thread counts are clamped, a cgroup must be a real cgroup directory.
    for cg in [
        "relative/path",
        "/etc",
        "/sys/fs/cgroup/../../etc",
        "/nonexistent/cg",
    ] {
        v.push(case(
            format!("populate cgroup {cg}"),
            inv,
            Call::Populate(pb::PopulateRequest {
                cgroup: cg.into(),
                ..populate.clone()
            }),
        ));
    }

    // Truncated and garbage protobuf, straight onto the wire.
    let good_bodies: Vec<(&'static str, Vec<u8>)> = vec![
        (
            "/memplace.v1.NodeAgentService/CreateRegion",
            create.encode_to_vec(),
        ),
        (
            "/memplace.v1.NodeAgentService/SetPolicy",
            set.encode_to_vec(),
        ),
        (
            "/memplace.v1.NodeAgentService/GetRegion",
            pb::GetRegionRequest {
                vm_id: "vm".into(),
                name: "r".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/memplace.v1.NodeAgentService/DeleteRegion",
            pb::DeleteRegionRequest {
                vm_id: "vm".into(),
                name: "r".into(),
                request_id: "rid-1".into(),
            }
            .encode_to_vec(),
        ),
        (
            "/memplace.v1.NodeAgentService/GetPlacement",
            placement.encode_to_vec(),
        ),
        (
            "/memplace.v1.NodeAgentService/ListRegions",
            pb::ListRegionsRequest {
                vm_id: "vm".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/memplace.v1.NodeAgentService/Reconcile",
            pb::ReconcileRequest { vm_id: "vm".into() }.encode_to_vec(),
        ),
    ];
    for (path, body) in good_bodies {
        // Cut inside the first length-delimited field (its tag and length are bytes 0 and 1).
        for cut in [1, 2, 3] {
            if cut < body.len() {
                v.push(case(
                    format!("{path} truncated to {cut} bytes"),
                    inv,
                    Call::Raw(path, body[..cut].to_vec()),
                ));
            }
        }
        v.push(case(
            format!("{path} with a length past the end"),
            inv,
            Call::Raw(path, vec![0x0a, 0x7f, b'v', b'm']),
        ));
        v.push(case(
            format!("{path} with an invalid wire type"),
            inv,
            Call::Raw(path, vec![0x0f, 0x01]),
        ));
        v.push(case(
            format!("{path} with invalid UTF-8 in a string"),
            inv,
            Call::Raw(path, vec![0x0a, 0x02, 0xff, 0xfe]),
        ));
        v.push(case(
            format!("{path} with an unterminated varint"),
            inv,
            Call::Raw(path, vec![0x18, 0xff, 0xff, 0xff]),
        ));
    }
    v
}

/// Row counts and generations read by the sqlite3 CLI.
fn db_state(agent: &AgentProc) -> String {
    sqlite::query(
        &agent.state_dir().join("memplace.db"),
        &[],
        "SELECT (SELECT count(*) FROM requests), (SELECT count(*) FROM regions), (SELECT count(*) FROM ranges), (SELECT group_concat(vm_id || '/' || name || '@' || generation) FROM regions), (SELECT count(*) FROM events);",
    )
}

/// A codec that sends and receives raw bytes, for malformed protobuf.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Pages of a region the kernel reports allocated (GetPlacement reads the page cache).
async fn allocated_pages(c: &mut Client, vm: &str, name: &str) -> u64 {
    let p = c.placement(vm, name, 0, 0).await.expect("GetPlacement");
    p.nodes.iter().map(|n| n.pages).sum::<u64>() + p.pages_unknown
}

/// Whether a case may allocate pages if the agent got it wrong: a Populate, typed or raw.
fn populates(call: &Call) -> bool {
    match call {
        Call::Populate(_) => true,
        Call::Raw(path, _) => path.ends_with("/Populate"),
        _ => false,
    }
}

async fn run(c: &mut Client, call: Call) -> Result<(), tonic::Status> {
    let r = c.raw();
    match call {
        Call::Create(q) => r.create_region(q).await.map(drop),
        Call::Get(q) => r.get_region(q).await.map(drop),
        Call::List(q) => r.list_regions(q).await.map(drop),
        Call::Delete(q) => r.delete_region(q).await.map(drop),
        Call::SetPolicy(q) => r.set_policy(q).await.map(drop),
        Call::Placement(q) => r.get_placement(q).await.map(drop),
        Call::Reconcile(q) => r.reconcile(q).await.map(drop),
        Call::Populate(q) => {
            let mut s = r.populate(q).await?.into_inner();
            while s.message().await?.is_some() {}
            Ok(())
        }
        Call::Watch(q) => {
            // A bad request must be refused; one that is accepted and follows would never end.
            let what = format!("the end of WatchEvents {q:?}");
            let mut s = r.watch_events(q).await?.into_inner();
            wait::within(&what, wait::PATIENCE, async {
                while s.message().await?.is_some() {}
                Ok(())
            })
            .await
        }
        Call::Raw(path, body) => {
            let mut g = tonic::client::Grpc::new(c.channel());
            g.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            g.unary(
                tonic::Request::new(body),
                http::uri::PathAndQuery::from_static(path),
                RawCodec,
            )
            .await
            .map(drop)
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "guest_memfd case: run by numa_guest's guest_memfd_cases_run_where_a_kernel_has_guest_memfd, on the host or in a guest whose KVM has guest_memfd"]
async fn generated_bad_requests_are_refused_and_change_nothing() {
    let agent = AgentProc::start_with(&["--max-message-bytes", "65536"]);
    let mut c = agent.client().await;
    c.retries = 0;
    c.create_region("vm", "r", SIZE, pb::Backend::Memfd, vec![])
        .await
        .unwrap();
    c.set_policy(
        "vm",
        "r",
        4 * MIB,
        4 * MIB,
        policy(pb::PolicyMode::Bind, &[0]),
        false,
    )
    .await
    .unwrap();
    // A guest_memfd region too: every Populate case that names "r" is tried on "g" as well.
    c.create_region("vm", "g", SIZE, pb::Backend::GuestMemfd, vec![])
        .await
        .unwrap();
    let regions = c.list_regions("").await.unwrap();
    let db = db_state(&agent);

    let mut cases = cases();
    let on_gmem: Vec<Case> = cases
        .iter()
        .filter_map(|k| match &k.call {
            Call::Populate(q) if q.vm_id == "vm" && q.name == "r" => Some(case(
                format!("{} (guest_memfd)", k.what),
                k.code,
                Call::Populate(pb::PopulateRequest {
                    name: "g".into(),
                    ..q.clone()
                }),
            )),
            _ => None,
        })
        .collect();
    assert!(!on_gmem.is_empty(), "no Populate case names region r");
    cases.extend(on_gmem);
    let total = cases.len();
    let mut wrong = Vec::new();
    let mut populate_cases = 0;
    for (i, case) in cases.into_iter().enumerate() {
        let populate = populates(&case.call);
        let result = run(&mut c, case.call).await;
        // A refused Populate allocated nothing: the memfd's own block count (st_blocks) and
        // what the kernel's page cache holds for both files (GetPlacement).
        if populate {
            populate_cases += 1;
            let memfd_bytes = memfd_allocated_bytes(agent.pid(), "vm", "r");
            let pages = (
                allocated_pages(&mut c, "vm", "r").await,
                allocated_pages(&mut c, "vm", "g").await,
            );
            if memfd_bytes != 0 || pages != (0, 0) {
                wrong.push(format!(
                    "{}: allocated pages (memfd st_blocks {memfd_bytes} bytes; GetPlacement: \
                     r {} pages, g {} pages)",
                    case.what, pages.0, pages.1
                ));
            }
        }
        match result {
            Ok(()) => wrong.push(format!("{}: accepted", case.what)),
            Err(s) if s.code() != case.code => wrong.push(format!(
                "{}: {:?} {:?}, want {:?}",
                case.what,
                s.code(),
                s.message(),
                case.code
            )),
            Err(s) if s.message().trim().len() < 10 => {
                wrong.push(format!("{}: unclear message {:?}", case.what, s.message()))
            }
            Err(_) => {}
        }
        if i % 50 == 49 {
            assert_eq!(db_state(&agent), db, "the database changed by case {i}");
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {total} cases went wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert_eq!(
        c.list_regions("").await.unwrap(),
        regions,
        "intent or observed policy changed"
    );
    assert_eq!(db_state(&agent), db, "the database changed");
    c.node_info().await.unwrap();
    println!(
        "{total} generated bad gRPC requests refused with the right code; {populate_cases} \
         Populate among them allocated no page"
    );
    assert!(populate_cases >= 40, "only {populate_cases} Populate cases");
    assert!(total >= 200, "only {total} cases");
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_bad_handoff_packets_are_refused_and_change_nothing() {
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    let token = c
        .create_region("vm", "r", SIZE, pb::Backend::Memfd, vec![])
        .await
        .unwrap()
        .handoff_token;
    let regions = c.list_regions("").await.unwrap();
    let db = db_state(&agent);
    let h = Handoff::connect(agent.handoff_socket()).unwrap();
    use pb::HandoffCode as H;
    use pb::handoff_request::Request as R;

    let mut cases: Vec<(String, Vec<u8>, bool, H)> = Vec::new();
    let acquire = |vm: &str, name: &str, token: &str| pb::HandoffRequest {
        request: Some(R::Acquire(pb::AcquireRequest {
            vm_id: vm.into(),
            name: name.into(),
            token: token.into(),
        })),
    };
    for n in bad_names() {
        let short: String = n.chars().take(12).collect();
        cases.push((
            format!("acquire vm_id {short:?}"),
            acquire(&n, "r", &token).encode_to_vec(),
            false,
            H::InvalidArgument,
        ));
        cases.push((
            format!("acquire name {short:?}"),
            acquire("vm", &n, &token).encode_to_vec(),
            false,
            H::InvalidArgument,
        ));
        cases.push((
            format!("attach vm_id {short:?}"),
            pb::HandoffRequest {
                request: Some(R::AttachVm(pb::AttachVmRequest {
                    vm_id: n.clone(),
                    token: token.clone(),
                })),
            }
            .encode_to_vec(),
            true,
            H::InvalidArgument,
        ));
    }
    let mut tokens = vec![
        String::new(),
        "x".into(),
        token[..token.len() - 1].to_string(),
        format!("{token}0"),
        token.to_uppercase(),
        "ü".repeat(40),
    ];
    tokens.dedup();
    for t in tokens.iter().filter(|t| **t != token) {
        cases.push((
            format!("acquire token {:?}", t.chars().take(8).collect::<String>()),
            acquire("vm", "r", t).encode_to_vec(),
            false,
            H::PermissionDenied,
        ));
    }
    cases.push((
        "acquire unknown region".into(),
        acquire("vm", "nope", &token).encode_to_vec(),
        false,
        H::NotFound,
    ));
    cases.push((
        "empty request".into(),
        pb::HandoffRequest { request: None }.encode_to_vec(),
        false,
        H::InvalidArgument,
    ));
    let full = acquire("vm", "r", &token).encode_to_vec();
    for cut in [1, 2, 3, 5, full.len() / 2, full.len() - 1] {
        cases.push((
            format!("acquire truncated to {cut} bytes"),
            full[..cut].to_vec(),
            false,
            H::InvalidArgument,
        ));
    }
    for (what, bytes) in [
        ("garbage", vec![0xffu8; 64]),
        ("bad wire type", vec![0x0f, 0x00]),
        ("invalid UTF-8", vec![0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe]),
        ("one zero byte", vec![0]),
    ] {
        cases.push((what.into(), bytes, false, H::InvalidArgument));
    }
    for (backend, size) in [
        (0, SIZE),
        (99, SIZE),
        (pb::Backend::Memfd as i32, 0),
        (pb::Backend::Memfd as i32, 4097),
        (pb::Backend::Memfd as i32, u64::MAX),
    ] {
        let req = pb::HandoffRequest {
            request: Some(R::Adopt(pb::AdoptRequest {
                vm_id: "vm".into(),
                name: "adopted".into(),
                backend,
                size_bytes: size,
                token: token.clone(),
            })),
        };
        cases.push((
            format!("adopt backend {backend} size {size}"),
            req.encode_to_vec(),
            true,
            H::InvalidArgument,
        ));
    }
    cases.push((
        "adopt without an fd".into(),
        pb::HandoffRequest {
            request: Some(R::Adopt(pb::AdoptRequest {
                vm_id: "vm".into(),
                name: "adopted".into(),
                backend: pb::Backend::Memfd as i32,
                size_bytes: SIZE,
                token: token.clone(),
            })),
        }
        .encode_to_vec(),
        false,
        H::InvalidArgument,
    ));
    cases.push((
        "attach_vm with a memfd instead of a VM fd".into(),
        pb::HandoffRequest {
            request: Some(R::AttachVm(pb::AttachVmRequest {
                vm_id: "vm".into(),
                token: token.clone(),
            })),
        }
        .encode_to_vec(),
        true,
        H::InvalidArgument,
    ));

    // An unrelated fd to pass where one is expected (a plain memfd, not a KVM VM fd).
    let stray = memplace_server::kernel::create_memfd("stray", SIZE, None).expect("memfd");
    let total = cases.len();
    let mut wrong = Vec::new();
    for (what, bytes, with_fd, want) in cases {
        let fds: Vec<_> = if with_fd { vec![stray.as_fd()] } else { vec![] };
        match h.exchange_raw(&bytes, &fds) {
            Ok((resp, got)) => {
                if resp.code != want as i32 {
                    wrong.push(format!(
                        "{what}: {:?} {:?}, want {want:?}",
                        H::try_from(resp.code),
                        resp.message
                    ));
                } else if resp.message.len() < 10 {
                    wrong.push(format!("{what}: unclear message {:?}", resp.message));
                }
                if !got.is_empty() {
                    wrong.push(format!("{what}: a refused request got {} fds", got.len()));
                }
            }
            Err(e) => wrong.push(format!("{what}: connection failed: {e}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {total} handoff cases went wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert_eq!(c.list_regions("").await.unwrap(), regions);
    assert_eq!(db_state(&agent), db, "the database changed");
    assert_eq!(c.get_region("vm", "r").await.unwrap().holder_pid, 0);
    c.node_info().await.unwrap();
    println!("{total} generated bad handoff packets refused with the right code");
}

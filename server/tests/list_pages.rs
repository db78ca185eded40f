//! ListRegions' pages (AIP-158) against the real agent: every region listed across pages exactly
//! once and in order, the last page's token empty; a page token still good after regions were
//! created and deleted between the calls; bad page sizes and tokens refused with
//! INVALID_ARGUMENT; and the client and `memplacectl region list` following the agent's default
//! pages to the end.

mod common;

use common::{AgentProc, Run};
use memplace_client::{Client, pb};
use tonic::Code;

/// Creates a one-page memfd region.
async fn create(c: &mut Client, vm: &str, name: &str) {
    let page = c.node_info().await.expect("GetNodeInfo").page_size_bytes;
    c.create_region(vm, name, page, pb::Backend::Memfd, vec![])
        .await
        .unwrap_or_else(|e| panic!("CreateRegion {vm}/{name}: {e}"));
}

/// One raw ListRegions call.
async fn page(
    c: &mut Client,
    vm: &str,
    size: i32,
    token: &str,
) -> Result<pb::ListRegionsResponse, tonic::Status> {
    c.raw()
        .list_regions(pb::ListRegionsRequest {
            vm_id: vm.into(),
            page_size: size,
            page_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn keys(rs: &[pb::Region]) -> Vec<(String, String)> {
    rs.iter()
        .map(|r| (r.vm_id.clone(), r.name.clone()))
        .collect()
}

/// Follows the pages of a listing by hand; returns each page's keys, checking that only the last
/// page has an empty token and that no page is larger than asked.
async fn pages(c: &mut Client, vm: &str, size: i32) -> Vec<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let p = page(c, vm, size, &token).await.expect("ListRegions");
        let most = if size == 0 { 1000 } else { size as usize };
        assert!(
            p.regions.len() <= most,
            "a page of {} regions, {size} asked",
            p.regions.len()
        );
        out.push(keys(&p.regions));
        if p.next_page_token.is_empty() {
            return out;
        }
        assert!(!p.regions.is_empty(), "an empty page with a next token");
        token = p.next_page_token;
        assert!(out.len() < 1000, "the pages never ended");
    }
}

#[tokio::test]
async fn pages_list_every_region_once_in_order() {
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    // Created out of order: the listing is by vm_id then name.
    let mut want = Vec::new();
    for i in (0..24).rev() {
        let vm = format!("vm{}", i % 3);
        let name = format!("r{i:02}");
        create(&mut c, &vm, &name).await;
        want.push((vm, name));
    }
    want.sort();
    // 24 regions in pages of 5: 5 pages, the last of 4; in pages of 4: 6 full pages, the last
    // one full and still ending the listing (no empty page after it).
    for (size, count, last) in [(5, 5, 4), (4, 6, 4), (1, 24, 1), (24, 1, 24), (0, 1, 24)] {
        let ps = pages(&mut c, "", size).await;
        assert_eq!(ps.len(), count, "pages of {size}");
        assert_eq!(ps.last().map(Vec::len), Some(last), "pages of {size}");
        let all: Vec<_> = ps.into_iter().flatten().collect();
        assert_eq!(all, want, "pages of {size}: every region once, in order");
    }
    // A VM's listing pages within the VM.
    let vm1: Vec<_> = want.iter().filter(|k| k.0 == "vm1").cloned().collect();
    let ps = pages(&mut c, "vm1", 3).await;
    assert_eq!(ps.len(), 3);
    assert_eq!(ps.into_iter().flatten().collect::<Vec<_>>(), vm1);
    // The client follows the pages.
    let (all, n) = c.list_regions_paged("", 7).await.expect("ListRegions");
    assert_eq!((keys(&all), n), (want.clone(), 4));
    assert_eq!(keys(&c.list_regions("vm1").await.unwrap()), vm1);
    // No region: one empty page, no token.
    let p = page(&mut c, "vm9", 2, "").await.unwrap();
    assert!(
        p.regions.is_empty() && p.next_page_token.is_empty(),
        "{p:?}"
    );
}

#[tokio::test]
async fn a_page_token_survives_creates_and_deletes_between_pages() {
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    for n in ["a", "b", "c", "d", "e", "f", "g"] {
        create(&mut c, "vm", n).await;
    }
    let first = page(&mut c, "", 3, "").await.unwrap();
    assert_eq!(
        keys(&first.regions)
            .iter()
            .map(|k| k.1.as_str())
            .collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    // Between the pages: the page's last region and one listed before it are deleted, one not yet
    // listed is deleted, and regions are created before the token (not listed: already passed)
    // and after it (listed).
    c.delete_region("vm", "c").await.unwrap();
    c.delete_region("vm", "a").await.unwrap();
    c.delete_region("vm", "e").await.unwrap();
    create(&mut c, "vm", "a2").await;
    create(&mut c, "vm", "c2").await;
    create(&mut c, "vm", "h").await;
    let mut rest = Vec::new();
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let p = page(&mut c, "", 3, &token)
            .await
            .expect("ListRegions with a token");
        rest.extend(keys(&p.regions).into_iter().map(|k| k.1));
        token = p.next_page_token;
    }
    assert_eq!(rest, ["c2", "d", "f", "g", "h"]);
}

#[tokio::test]
async fn bad_page_sizes_and_tokens_are_invalid_argument() {
    let agent = AgentProc::start();
    let mut c = agent.client().await;
    for n in ["a", "b", "c"] {
        create(&mut c, "vm", n).await;
    }
    let e = page(&mut c, "", -1, "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("page_size -1 is negative"),
        "{}",
        e.message()
    );
    for t in ["garbage", "31", "0", "312f2f766d2f6221"] {
        let e = page(&mut c, "", 2, t).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{t}: {e:?}");
        assert!(
            e.message().contains("is not a ListRegions page token"),
            "{t}: {}",
            e.message()
        );
    }
    // A token keeps its listing's vm_id.
    let t = page(&mut c, "vm", 1, "").await.unwrap().next_page_token;
    assert!(!t.is_empty());
    let e = page(&mut c, "", 1, &t).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("vm_id"), "{}", e.message());
    // A large page size is capped, not refused.
    let p = page(&mut c, "", i32::MAX, "").await.unwrap();
    assert_eq!(p.regions.len(), 3);
    assert!(p.next_page_token.is_empty());
}

/// More regions than the agent's default page (1000): the client and `memplacectl region list`
/// return every one.
#[tokio::test]
async fn the_client_and_cli_follow_the_default_pages() {
    const N: usize = 1001;
    let agent = AgentProc::start();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..4 {
        let mut c = agent.client().await;
        tasks.spawn(async move {
            for i in (w..N).step_by(4) {
                create(&mut c, &format!("vm{}", i % 7), &format!("r{i:04}")).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("create task");
    }
    let mut c = agent.client().await;
    let first = page(&mut c, "", 0, "").await.unwrap();
    assert_eq!(first.regions.len(), 1000, "the default page");
    assert!(!first.next_page_token.is_empty());
    let (all, pages) = c.list_regions_paged("", 0).await.unwrap();
    assert_eq!((all.len(), pages), (N, 2));
    let mut sorted = keys(&all);
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, keys(&all), "in order, each once");
    assert_eq!(c.list_regions("").await.unwrap().len(), N);
    let out = Run::of(agent.ctl().args(["-o", "json", "region", "list"])).json();
    assert_eq!(
        out.as_array().map(Vec::len),
        Some(N),
        "memplacectl region list"
    );
}

//! ListRegions' pages (AIP-158): the page size a request asks for, and the opaque page token that
//! names the last region of the previous page. The token holds the key, not an offset, so a page
//! continues after that region in key order however many regions were created or deleted between
//! the calls: a region that exists throughout a listing is returned exactly once.

use crate::domain::{DomainError, RegionKey};
use tonic::Status;

/// Regions in a page when the request's `page_size` is 0.
pub const DEFAULT_PAGE_SIZE: usize = 1000;
/// Most regions in a page: a larger `page_size` is lowered to it (at about 500 bytes a region of
/// 16 ranges, 5000 regions stay well under gRPC's default 4 MiB message limit).
pub const MAX_PAGE_SIZE: usize = 5000;

/// The token format's version: a token of another version is refused as malformed.
const VERSION: &str = "1";

/// One page request, checked.
#[derive(Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Most regions to return.
    pub size: usize,
    /// The last region of the previous page; `None` for the first page.
    pub after: Option<RegionKey>,
}

/// Checks a ListRegions request's `page_size` and `page_token` (issued for the same `vm_id`).
pub fn page_request(vm_id: &str, page_size: i32, page_token: &str) -> Result<PageRequest, Status> {
    let size = match page_size {
        n if n < 0 => {
            return Err(Status::invalid_argument(format!(
                "page_size {n} is negative: give 0 for the default ({DEFAULT_PAGE_SIZE}) or a count up to {MAX_PAGE_SIZE}"
            )));
        }
        0 => DEFAULT_PAGE_SIZE,
        n => (n as usize).min(MAX_PAGE_SIZE),
    };
    let after = if page_token.is_empty() {
        None
    } else {
        Some(token_key(vm_id, page_token)?)
    };
    Ok(PageRequest { size, after })
}

/// The token for the page after the region `last_vm`/`last_name`, in a listing filtered to
/// `vm_id` ("" for all).
pub fn next_page_token(vm_id: &str, last_vm: &str, last_name: &str) -> String {
    let plain = format!("{VERSION}/{vm_id}/{last_vm}/{last_name}");
    plain.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The last key a token names, if it is a token this agent issued for a listing of `vm_id`.
fn token_key(vm_id: &str, token: &str) -> Result<RegionKey, Status> {
    let bad = |why: &str| {
        Status::invalid_argument(format!(
            "page_token {:?} is not a ListRegions page token: {why}; pass the next_page_token of the previous answer unchanged, or an empty token for the first page",
            token.chars().take(80).collect::<String>()
        ))
    };
    let plain = unhex(token).ok_or_else(|| bad("it does not decode"))?;
    let parts: Vec<&str> = plain.split('/').collect();
    let [version, filter, vm, name] = parts[..] else {
        return Err(bad("it does not decode"));
    };
    if version != VERSION {
        return Err(bad("it does not decode"));
    }
    if filter != vm_id {
        return Err(Status::invalid_argument(format!(
            "page_token was issued for a listing of vm_id {filter:?}, but this request lists vm_id {vm_id:?}: a listing keeps its vm_id across pages"
        )));
    }
    RegionKey::parse(vm, name).map_err(|e: DomainError| bad(&e.to_string()))
}

/// Hex digits to text, if `s` is an even count of lowercase hex digits spelling UTF-8.
fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = s
        .as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn key(vm: &str, name: &str) -> RegionKey {
        RegionKey::parse(vm, name).unwrap()
    }

    #[test]
    fn a_token_names_the_last_key_of_its_listing() {
        for filter in ["", "vm-1"] {
            let k = key("vm-1", "ram.0_x");
            let t = next_page_token(filter, &k.vm_id, &k.name);
            let p = page_request(filter, 7, &t).unwrap();
            assert_eq!(
                p,
                PageRequest {
                    size: 7,
                    after: Some(k)
                }
            );
        }
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_request("", 0, "").unwrap().size, DEFAULT_PAGE_SIZE);
        assert_eq!(page_request("", 1, "").unwrap().size, 1);
        assert_eq!(page_request("", i32::MAX, "").unwrap().size, MAX_PAGE_SIZE);
        let e = page_request("", -1, "").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains("page_size -1 is negative"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn malformed_tokens_are_invalid_argument() {
        let good = next_page_token("", "vm", "r");
        let other_version = "2/vm/vm/r".bytes().map(|b| format!("{b:02x}")).collect();
        let bad_name = "1//vm/r r".bytes().map(|b| format!("{b:02x}")).collect();
        let extra = "1//vm/r/x".bytes().map(|b| format!("{b:02x}")).collect();
        for t in [
            "x".to_string(),
            "zz".into(),
            good[1..].to_string(),
            good.to_uppercase(),
            "ff".into(),
            other_version,
            bad_name,
            extra,
        ] {
            let e = page_request("", 0, &t).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{t}");
            assert!(
                e.message().contains("is not a ListRegions page token"),
                "{t}: {}",
                e.message()
            );
        }
    }

    #[test]
    fn a_token_of_another_vm_filter_is_refused() {
        let t = next_page_token("vm-a", "vm-a", "r");
        let e = page_request("vm-b", 0, &t).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("vm_id \"vm-a\""), "{}", e.message());
        assert!(page_request("", 0, &t).is_err());
    }
}

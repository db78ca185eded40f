//! The bench table's judgements (benches/table/judge.rs, the same file the bench includes), checked
//! without running the bench.

#[path = "../benches/table/judge.rs"]
mod judge;

use std::time::Duration;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One sample whose every request is slow, among samples that are quick: the median of the
/// per-sample p99s is quick, but the p99 over all requests is the slow sample's, and the goal
/// is judged on that.
#[test]
fn p2_judges_the_p99_over_all_requests() {
    let quick = vec![ms(1); 100];
    let slow = vec![ms(50); 100];
    let samples = vec![quick.clone(), slow, quick.clone()];
    assert_eq!(judge::p2_p99_over_all(&samples), ms(50));
    assert!(
        !judge::p2_met(2.0, &samples),
        "a third of the requests at 50 ms must miss p99 <= 10 ms"
    );
    // All quick: met, as long as the throughput goal is.
    let samples = vec![quick.clone(), quick.clone(), quick];
    assert!(judge::p2_met(2.0, &samples));
    assert!(!judge::p2_met(1.4, &samples));
    // 1 slow request in 100 is within the p99; 2 in 100 are not.
    let mut one = vec![ms(1); 99];
    one.push(ms(50));
    assert!(judge::p2_met(2.0, &[one.clone()]));
    let mut two = vec![ms(1); 98];
    two.extend([ms(50), ms(50)]);
    assert!(!judge::p2_met(2.0, &[two]));
}

#[test]
fn p5_is_not_verified_without_ranges() {
    assert_eq!(judge::p5_ranges_problem(&[7, 7], 7), None);
    let none = judge::p5_ranges_problem(&[], 7).expect("no ranges verifies nothing");
    assert!(none.contains("no ranges"), "{none}");
    let other = judge::p5_ranges_problem(&[7, 0], 7).expect("a range counted elsewhere");
    assert!(other.contains("did not count from the holder"), "{other}");
}

/// S1's goals, each judged on its own: a figure just inside its goal passes, one just outside
/// misses, and the pass's share is taken of the interval it is spread over.
#[test]
fn s1_judges_each_goal() {
    let good = judge::ScaleFigures {
        held_ms: 1000.0,
        unheld_ms: 900.0,
        held_ratio: 3.0,
        unheld_ratio: 2.0,
        rss_mib: 128.0,
        pass_cpu_ms: 300.0,
        interval_secs: 30,
        list_ms: 50.0,
    };
    let met = |f: &judge::ScaleFigures| -> Vec<bool> {
        judge::s1_goals(f).into_iter().map(|(_, _, m)| m).collect()
    };
    assert_eq!(met(&good), vec![true; 5]);
    let miss = |f: judge::ScaleFigures, which: usize| {
        let mut want = vec![true; 5];
        want[which] = false;
        assert_eq!(met(&f), want, "{f:?}");
    };
    miss(
        judge::ScaleFigures {
            unheld_ms: 1001.0,
            ..good.clone()
        },
        0,
    );
    miss(
        judge::ScaleFigures {
            held_ratio: 3.1,
            ..good.clone()
        },
        1,
    );
    miss(
        judge::ScaleFigures {
            rss_mib: 129.0,
            ..good.clone()
        },
        2,
    );
    // 300 ms per 30 s is 1 %; per 10 s it is 3 %.
    miss(
        judge::ScaleFigures {
            interval_secs: 10,
            ..good.clone()
        },
        3,
    );
    miss(
        judge::ScaleFigures {
            list_ms: 50.5,
            ..good.clone()
        },
        4,
    );
    let shown = judge::s1_goals(&good);
    assert!(shown[3].1.contains("1.000 %"), "{:?}", shown[3]);
}

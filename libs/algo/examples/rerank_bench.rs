//! Times `rerank` on 200 candidates → 20 with MMR, boosts, caps and
//! exploration on (the default rules), and prints percentiles.
//!
//! `cargo run --release -p recmesh-algo --example rerank_bench`

use std::collections::HashSet;
use std::time::{Duration, Instant};

use recmesh_algo::rerank::{RerankItem, RerankRequest, RerankRules, rerank, seed_of};
use recmesh_algo::rules::{HardFilters, RuleItem};

fn main() {
    const CANDIDATES: usize = 200;
    const RUNS: usize = 20_000;
    let categories: Vec<String> = (0..12).map(|c| format!("cat{c}")).collect();
    let brands: Vec<String> = (0..96).map(|b| format!("brand{b}")).collect();
    let ids: Vec<String> = (0..CANDIDATES).map(|i| format!("i{i}")).collect();
    let now = 1_800_000_000i64;
    let items: Vec<RerankItem<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| RerankItem {
            rule: RuleItem {
                id,
                category: &categories[(i * 7) % 12],
                price: 5.0 + (i % 50) as f64 * 3.0,
                in_stock: i % 15 != 0,
            },
            brand: &brands[(i * 13) % 96],
            promoted: i % 20 == 0,
            created_at_s: now - (i as i64 % 90) * 86_400,
            score: 1.0 - i as f64 / CANDIDATES as f64,
        })
        .collect();
    let rules = RerankRules::default();
    let mut timings = Vec::with_capacity(RUNS);
    let mut kept = 0;
    for run in 0..RUNS {
        let request_id = format!("req-{run}");
        let req = RerankRequest {
            filters: HardFilters {
                excluded: ["i3", "i9"].into(),
                purchased: ["i5"].into(),
                ..HardFilters::default()
            },
            recent_views: vec![],
            usual_categories: HashSet::from(["cat0", "cat1", "cat2"]),
            now_s: now,
            seed: seed_of(&request_id),
            count: 20,
        };
        let started = Instant::now();
        let out = rerank(&items, &rules, &req);
        timings.push(started.elapsed());
        kept += out.items.len();
    }
    timings.sort();
    let q = |p: f64| timings[((timings.len() - 1) as f64 * p) as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "rerank {CANDIDATES} -> 20 (default rules, MMR lambda {}), {RUNS} runs: p50 {:.0} us, p99 {:.0} us, max {:.0} us ({} items/run)",
        rules.mmr_lambda,
        us(q(0.5)),
        us(q(0.99)),
        us(q(1.0)),
        kept / RUNS
    );
}

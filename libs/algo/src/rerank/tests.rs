use super::*;

/// A seeded generator for the property tests (no dependency needed).
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = mix(self.0);
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p
    }
}

const CATEGORIES: [&str; 5] = ["a", "b", "c", "d", "e"];
const BRANDS: [&str; 10] = ["a0", "a1", "b0", "b1", "c0", "c1", "d0", "d1", "e0", "e1"];
const NOW: i64 = 1_000_000_000;

struct Case {
    ids: Vec<String>,
    items: Vec<(usize, usize, f64, bool, bool, i64, f64)>,
}

impl Case {
    fn random(g: &mut Gen, n: usize) -> Case {
        let ids = (0..n)
            .map(|i| format!("i{}", g.below(n as u64 * 2).max(i as u64 % 3)))
            .collect();
        let items = (0..n)
            .map(|_| {
                let c = g.below(5) as usize;
                (
                    c,
                    c * 2 + g.below(2) as usize,
                    1.0 + g.below(200) as f64,
                    g.chance(0.9),
                    g.chance(0.1),
                    NOW - g.below(120) as i64 * 86_400,
                    (g.below(10_000) as f64 / 100.0) - 20.0,
                )
            })
            .collect();
        Case { ids, items }
    }

    fn view(&self) -> Vec<RerankItem<'_>> {
        self.ids
            .iter()
            .zip(&self.items)
            .map(
                |(id, &(c, b, price, in_stock, promoted, created, score))| RerankItem {
                    rule: RuleItem {
                        id,
                        category: CATEGORIES[c],
                        price,
                        in_stock,
                    },
                    brand: BRANDS[b],
                    promoted,
                    created_at_s: created,
                    score,
                },
            )
            .collect()
    }
}

fn request<'a>(g: &mut Gen, case: &'a Case, count: usize) -> RerankRequest<'a> {
    let pick = |g: &mut Gen| case.ids[g.below(case.ids.len() as u64) as usize].as_str();
    RerankRequest {
        filters: HardFilters {
            excluded: (0..3).map(|_| pick(g)).collect(),
            purchased: (0..3).map(|_| pick(g)).collect(),
            seen: (0..5).map(|_| crate::seen::item_key(pick(g))).collect(),
            categories: if g.chance(0.3) {
                ["a", "b", "c"].into()
            } else {
                HashSet::new()
            },
            min_price: if g.chance(0.3) { 20.0 } else { 0.0 },
            max_price: if g.chance(0.3) { 150.0 } else { 0.0 },
        },
        recent_views: (0..3).map(|k| (pick(g), NOW - k * 3_000)).collect(),
        usual_categories: ["a", "b"].into(),
        now_s: NOW,
        seed: g.next(),
        count,
    }
}

fn random_rules(g: &mut Gen) -> RerankRules {
    RerankRules {
        category_cap: g.below(5) as u32,
        brand_cap: g.below(4) as u32,
        promoted_boost: 1.0 + g.below(40) as f64 / 10.0,
        new_arrival_boost: 1.0 + g.below(40) as f64 / 10.0,
        new_arrival_days: g.below(60) as u32,
        mmr_lambda: g.below(11) as f64 / 10.0,
        exploration_share: g.below(6) as f64 / 10.0,
        exploration_pool: [0, 1, 5, 20][g.below(4) as usize],
        exploration_start: g.below(11) as f64 / 10.0,
        recently_viewed_window_s: if g.chance(0.5) { 5_000 } else { 0 },
    }
}

#[test]
fn no_filtered_item_is_ever_returned_and_caps_hold() {
    let mut g = Gen(1);
    for _ in 0..2_000 {
        let n = 1 + g.below(80) as usize;
        let case = Case::random(&mut g, n);
        let items = case.view();
        let rules = random_rules(&mut g);
        let count = 1 + g.below(30) as usize;
        let req = request(&mut g, &case, count);
        let out = rerank(&items, &rules, &req);
        assert!(out.items.len() <= req.count);
        let mut ids = HashSet::new();
        let mut per_category: HashMap<&str, u32> = HashMap::new();
        let mut per_brand: HashMap<&str, u32> = HashMap::new();
        for p in &out.items {
            let it = &items[p.index];
            assert!(ids.insert(it.rule.id), "duplicate {}", it.rule.id);
            assert_eq!(
                req.filters.check(&it.rule),
                None,
                "filtered item {:?} returned",
                it.rule
            );
            assert!(
                !req.filters
                    .seen
                    .contains(&crate::seen::item_key(it.rule.id)),
                "seen item {} returned",
                it.rule.id
            );
            if rules.recently_viewed_window_s > 0 {
                assert!(
                    !req.recent_views
                        .iter()
                        .any(|(id, ts)| *id == it.rule.id && NOW - ts <= 5_000)
                );
            }
            *per_category.entry(it.rule.category).or_default() += 1;
            *per_brand.entry(it.brand).or_default() += 1;
        }
        if rules.category_cap > 0 {
            assert!(
                per_category.values().all(|&n| n <= rules.category_cap),
                "{per_category:?} {rules:?}"
            );
        }
        if rules.brand_cap > 0 {
            assert!(
                per_brand.values().all(|&n| n <= rules.brand_cap),
                "{per_brand:?} {rules:?}"
            );
        }
    }
}

#[test]
fn lambda_one_without_boosts_caps_or_exploration_is_score_order() {
    let mut g = Gen(2);
    let plain = RerankRules {
        category_cap: 0,
        brand_cap: 0,
        promoted_boost: 1.0,
        new_arrival_boost: 1.0,
        mmr_lambda: 1.0,
        exploration_share: 0.0,
        ..RerankRules::default()
    };
    for _ in 0..1_000 {
        let n = 1 + g.below(60) as usize;
        let case = Case::random(&mut g, n);
        let items = case.view();
        let req = RerankRequest {
            now_s: NOW,
            count: 1 + g.below(30) as usize,
            ..RerankRequest::default()
        };
        let out = rerank(&items, &plain, &req);
        let mut expected: Vec<usize> = Vec::new();
        let mut seen = HashSet::new();
        for (i, it) in items.iter().enumerate() {
            // Duplicates go first (the first occurrence wins), then stock.
            if seen.insert(it.rule.id) && it.rule.in_stock {
                expected.push(i);
            }
        }
        // Stable sort by score, best first: ties keep the ranking's order.
        expected.sort_by(|&a, &b| items[b].score.total_cmp(&items[a].score));
        expected.truncate(req.count);
        let got: Vec<usize> = out.items.iter().map(|p| p.index).collect();
        assert_eq!(got, expected);
    }
}

#[test]
fn the_same_request_id_gives_the_same_list() {
    let mut g = Gen(3);
    for _ in 0..500 {
        let case = Case::random(&mut g, 40);
        let items = case.view();
        let rules = random_rules(&mut g);
        let mut req = request(&mut g, &case, 10);
        req.seed = seed_of("request-7");
        let a = rerank(&items, &rules, &req);
        let b = rerank(&items, &rules, &req);
        assert_eq!(a.items, b.items);
    }
    // And a different id explores differently (over many ids, not each).
    let case = Case::random(&mut Gen(9), 80);
    let items = case.view();
    let rules = RerankRules {
        exploration_share: 0.5,
        ..RerankRules::default()
    };
    let lists: HashSet<Vec<usize>> = (0..20)
        .map(|n| {
            let req = RerankRequest {
                usual_categories: ["a"].into(),
                now_s: NOW,
                seed: seed_of(&format!("r{n}")),
                count: 10,
                ..RerankRequest::default()
            };
            rerank(&items, &rules, &req)
                .items
                .iter()
                .map(|p| p.index)
                .collect()
        })
        .collect();
    assert!(lists.len() > 1);
}

#[test]
fn a_bigger_boost_never_moves_a_promoted_item_down() {
    let mut g = Gen(4);
    for _ in 0..1_000 {
        let case = Case::random(&mut g, 30);
        let items = case.view();
        let req = RerankRequest {
            now_s: NOW,
            count: 30,
            ..RerankRequest::default()
        };
        let at = |boost: f64| {
            let rules = RerankRules {
                category_cap: 0,
                brand_cap: 0,
                promoted_boost: boost,
                new_arrival_boost: 1.0,
                mmr_lambda: 1.0,
                exploration_share: 0.0,
                ..RerankRules::default()
            };
            let out = rerank(&items, &rules, &req);
            out.items
                .iter()
                .enumerate()
                .filter(|(_, p)| items[p.index].promoted)
                .map(|(pos, p)| (p.index, pos))
                .collect::<HashMap<usize, usize>>()
        };
        let (low, high) = (at(1.1), at(2.0));
        for (index, pos) in &high {
            assert!(pos <= &low[index], "item {index}: {} → {pos}", low[index]);
        }
    }
}

#[test]
fn exploration_takes_its_share_outside_usual_categories_spread_out() {
    let case = Case::random(&mut Gen(5), 100);
    let items = case.view();
    let rules = RerankRules {
        exploration_share: 0.2,
        exploration_start: 0.0,
        new_arrival_days: 0,
        ..RerankRules::default()
    };
    let req = RerankRequest {
        usual_categories: ["a", "b"].into(),
        now_s: NOW,
        seed: seed_of("x"),
        count: 10,
        ..RerankRequest::default()
    };
    let out = rerank(&items, &rules, &req);
    let explored: Vec<usize> = out
        .items
        .iter()
        .enumerate()
        .filter(|(_, p)| p.explore)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(explored.len(), 2);
    assert_eq!(explored, vec![3, 6], "spread at 1/3 and 2/3 of the list");
    for p in out.items.iter().filter(|p| p.explore) {
        assert!(!["a", "b"].contains(&items[p.index].rule.category));
    }
}

#[test]
fn exploration_draws_from_the_best_of_its_pool_and_goes_below_its_start() {
    // Twenty items of a category the user does not usually see, scored
    // 20 down to 1, and twenty usual ones scored above them.
    let ids: Vec<String> = (0..40).map(|n| format!("i{n}")).collect();
    let items: Vec<RerankItem<'_>> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let (category, score) = if n < 20 {
                ("usual", 100.0 - n as f64)
            } else {
                ("other", 40.0 - n as f64)
            };
            plain_item(id, category, "", 0.0, score)
        })
        .collect();
    let run = |pool: u32, start: f64, seed: &str| {
        let rules = RerankRules {
            category_cap: 0,
            brand_cap: 0,
            mmr_lambda: 1.0,
            exploration_share: 0.2,
            exploration_pool: pool,
            exploration_start: start,
            new_arrival_days: 0,
            ..RerankRules::default()
        };
        let req = RerankRequest {
            usual_categories: ["usual"].into(),
            now_s: NOW,
            seed: seed_of(seed),
            count: 10,
            ..RerankRequest::default()
        };
        rerank(&items, &rules, &req)
    };
    let explored = |out: &Reranked| -> Vec<(usize, usize)> {
        out.items
            .iter()
            .enumerate()
            .filter(|(_, p)| p.explore)
            .map(|(at, p)| (at, p.index))
            .collect()
    };
    // A pool of 3: whatever the seed, only the three best "other" items
    // (inputs 20, 21, 22) are ever explored; from the whole pool, others are.
    let mut from_all = HashSet::new();
    for seed in 0..50 {
        let seed = seed.to_string();
        for (_, index) in explored(&run(3, 0.0, &seed)) {
            assert!((20..23).contains(&index), "explored input {index}");
        }
        from_all.extend(explored(&run(0, 0.0, &seed)).into_iter().map(|(_, i)| i));
    }
    assert!(from_all.iter().any(|&i| i >= 23), "{from_all:?}");
    // Start 0 spreads the two slots at 1/3 and 2/3 of the list; 0.5 over
    // its second half; 1 puts them last.
    let at = |start: f64| -> Vec<usize> {
        explored(&run(3, start, "x"))
            .into_iter()
            .map(|(at, _)| at)
            .collect()
    };
    assert_eq!(at(0.0), vec![3, 6]);
    assert_eq!(at(0.5), vec![6, 8]);
    assert_eq!(at(1.0), vec![8, 9]);
    // The rest of the list is the usual items in score order, wherever the
    // exploration slots go.
    for start in [0.0, 0.5, 1.0] {
        let main: Vec<usize> = run(3, start, "x")
            .items
            .iter()
            .filter(|p| !p.explore)
            .map(|p| p.index)
            .collect();
        assert_eq!(main, (0..8).collect::<Vec<_>>());
    }
}

/// An in-stock, unpromoted, old item.
fn plain_item<'a>(
    id: &'a str,
    category: &'a str,
    brand: &'a str,
    price: f64,
    score: f64,
) -> RerankItem<'a> {
    RerankItem {
        rule: RuleItem {
            id,
            category,
            price,
            in_stock: true,
        },
        brand,
        promoted: false,
        created_at_s: 0,
        score,
    }
}

#[test]
fn items_without_a_brand_are_not_capped_as_one_brand() {
    // Five items with no brand (a film catalog) and two of brand "b":
    // the brand cap of 2 holds back only the third "b".
    let ids = ["n1", "n2", "n3", "n4", "n5", "b1", "b2", "b3"];
    let items: Vec<RerankItem<'_>> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let brand = if id.starts_with('b') { "b" } else { "" };
            plain_item(id, "films", brand, 0.0, 10.0 - n as f64)
        })
        .collect();
    let rules = RerankRules {
        category_cap: 0,
        brand_cap: 2,
        mmr_lambda: 1.0,
        exploration_share: 0.0,
        ..RerankRules::default()
    };
    let req = RerankRequest {
        now_s: NOW,
        count: 8,
        ..RerankRequest::default()
    };
    let out = rerank(&items, &rules, &req);
    let got: Vec<&str> = out.items.iter().map(|p| items[p.index].rule.id).collect();
    assert_eq!(got, ["n1", "n2", "n3", "n4", "n5", "b1", "b2"]);
    assert_eq!(out.removed.get(&Removal::BrandCap), Some(&1));
    // Nor are two unknown brands (or categories) alike to MMR and the
    // diversity metric.
    assert_eq!(
        attribute_similarity(("", "", 0.0), ("", "", 0.0)),
        1.0 / 3.0
    );
    assert_eq!(attribute_similarity(("c", "b", 0.0), ("c", "b", 0.0)), 1.0);
}

#[test]
fn mmr_trades_score_for_variety() {
    // Three near-identical top items (same category, brand and price band)
    // and one different item slightly below them.
    let ids = ["x1", "x2", "x3", "y"];
    let items: Vec<RerankItem<'_>> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let (category, brand) = if *id == "y" {
                ("other", "b2")
            } else {
                ("same", "b1")
            };
            plain_item(id, category, brand, 10.0, [1.0, 0.99, 0.98, 0.9][n])
        })
        .collect();
    let req = RerankRequest {
        now_s: NOW,
        count: 2,
        ..RerankRequest::default()
    };
    let pick = |lambda: f64| {
        let rules = RerankRules {
            category_cap: 0,
            brand_cap: 0,
            mmr_lambda: lambda,
            exploration_share: 0.0,
            ..RerankRules::default()
        };
        rerank(&items, &rules, &req)
            .items
            .iter()
            .map(|p| ids[p.index])
            .collect::<Vec<_>>()
    };
    assert_eq!(pick(1.0), vec!["x1", "x2"]);
    assert_eq!(pick(0.5), vec!["x1", "y"]);
}

#[test]
fn rules_are_validated_naming_the_rule() {
    assert!(RerankRules::default().validate().is_ok());
    let over = |k: &str, v: &str| {
        RerankRules::default()
            .with(&[(k.to_string(), v.to_string())].into())
            .expect_err(k)
            .key
    };
    assert_eq!(over("mmr_lambda", "1.5"), "mmr_lambda");
    assert_eq!(over("exploration_share", "0.9"), "exploration_share");
    assert_eq!(over("exploration_pool", "10001"), "exploration_pool");
    assert_eq!(over("exploration_start", "1.5"), "exploration_start");
    assert_eq!(over("exploration_start", "-0.1"), "exploration_start");
    assert_eq!(over("promoted_boost", "abc"), "promoted_boost");
    assert_eq!(over("brand_cap", "-1"), "brand_cap");
    assert_eq!(over("mmr_lamda", "0.5"), "mmr_lamda");
    let r = RerankRules::default()
        .with(&[("mmr_lambda".to_string(), "0.5".to_string())].into())
        .expect("valid");
    assert_eq!(r.mmr_lambda, 0.5);
}

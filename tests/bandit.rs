//! The bandit as a library: UCB order, reward sharing, seeded sampling, budgets, strategies,
//! resumption, and a planted-structure pool where quad must beat random.
mod planted;

use std::collections::{BTreeMap, HashSet};

use quad::bandit::{
    Bandit, BanditConfig, BanditError, Budget, ClusterInput, DocLoc, InMemoryBandit, Member,
    MemberRef, RewardScale, TauMode,
};
use quad::config::Strategy;
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn small(id: u32, centroid: Vec<f32>, docs: u64, tokens: u64) -> ClusterInput {
    ClusterInput {
        id,
        centroid,
        members: (0..docs)
            .map(|row| Member {
                loc: DocLoc {
                    shard: 0,
                    row_group: 0,
                    row: u64::from(id) * 1000 + row,
                },
                tokens,
            })
            .collect(),
    }
}

/// Raw rewards: these tests check the arithmetic of arms, scores and sharing by hand.
fn config(r: usize) -> BanditConfig {
    BanditConfig {
        reward: RewardScale::Raw,
        clusters_per_round: r,
        n_min: 2,
        gamma: 0.01,
        budget: Budget::Tokens(1_000_000),
        ..Default::default()
    }
}

fn scores_of(
    pulls: &[quad::bandit::Pull],
    value: impl Fn(&MemberRef) -> f64,
) -> Vec<(MemberRef, f64)> {
    pulls
        .iter()
        .flat_map(|p| p.members.iter().map(|m| (*m, value(m))))
        .collect()
}

#[test]
fn untried_arms_come_first_then_the_highest_ucb_score() {
    let axes = |i: usize| {
        let mut v = vec![0.0f32; 3];
        v[i] = 1.0;
        v
    };
    let mut b = InMemoryBandit::new(1, Strategy::Quad, config(1)).unwrap();
    b.sync_clusters(&[
        small(7, axes(0), 10, 5),
        small(2, axes(1), 10, 5),
        small(5, axes(2), 10, 5),
    ])
    .unwrap();
    let reward = |c: u32| match c {
        2 => 0.1,
        5 => 0.9,
        _ => 0.5,
    };
    // All untried: by id.
    let mut order = Vec::new();
    for round in 0..3 {
        let pulls = b.plan_round(round);
        assert_eq!(pulls.len(), 1);
        assert_eq!(pulls[0].cluster_score, None, "untried arm");
        order.push(pulls[0].cluster);
        b.observe(round, &scores_of(&pulls, |m| reward(m.cluster)))
            .unwrap();
    }
    assert_eq!(order, vec![2, 5, 7]);
    // Equal bonus sqrt(2 ln 3 / 1): the best mean wins, and its score is the formula's.
    let pulls = b.plan_round(3);
    assert_eq!(pulls[0].cluster, 5);
    let want = 0.9 + (2.0 * 3f64.ln()).sqrt();
    assert!((pulls[0].cluster_score.unwrap() - want).abs() < 1e-12);
    let scores: BTreeMap<u32, Option<f64>> = b.cluster_scores().into_iter().collect();
    assert!((scores[&2].unwrap() - (0.1 + (2.0 * 3f64.ln()).sqrt())).abs() < 1e-12);
}

#[test]
fn reward_sharing_matches_hand_computed_values() {
    // c1 at cosine distance 0.05 from c0 (inside rho = 0.2), c2 orthogonal (distance 1).
    let cos = 0.95f64;
    let c1 = vec![cos as f32, (1.0 - cos * cos).sqrt() as f32];
    let mut b = InMemoryBandit::new(3, Strategy::Quad, config(1)).unwrap();
    b.sync_clusters(&[
        small(0, vec![1.0, 0.0], 10, 5),
        small(1, c1, 10, 5),
        small(2, vec![0.0, 1.0], 10, 5),
    ])
    .unwrap();
    let pulls = b.plan_round(0);
    assert_eq!(pulls[0].cluster, 0);
    assert_eq!(pulls[0].members.len(), 2, "n_min = 2");
    let values = [0.2, 0.6];
    let scores: Vec<(MemberRef, f64)> = pulls[0].members.iter().copied().zip(values).collect();
    let out = b.observe(0, &scores).unwrap();
    assert_eq!(out.rewards, vec![(0, 0.4)]);
    let arms: BTreeMap<u32, quad::bandit::Arm> = b.arms().into_iter().collect();
    assert_eq!((arms[&0].pulls, arms[&0].own_pulls), (1, 1));
    assert!((arms[&0].reward_sum - 0.4).abs() < 1e-12);
    // T_1 += 1, S_1 += 0.4 * (1 - 0.05 / 0.2) = 0.3 (f32 centroids: tolerance 1e-6).
    assert_eq!((arms[&1].pulls, arms[&1].own_pulls), (1, 0));
    assert!(
        (arms[&1].reward_sum - 0.3).abs() < 1e-6,
        "{}",
        arms[&1].reward_sum
    );
    assert_eq!(arms[&2].pulls, 0);
    assert_eq!(arms[&2].reward_sum, 0.0);
    // Credit is not a try: arm 1, never sampled itself, still ranks first (by id before 2),
    // so every cluster is sampled at least once.
    assert_eq!(b.plan_round(1)[0].cluster, 1);
    assert_eq!(b.cluster_scores()[1].1, None);
}

#[test]
fn sampling_is_seeded_and_never_repeats_a_document() {
    let cfg = BanditConfig {
        budget: Budget::Ratio(1.0),
        tau: f64::MIN,
        ..config(4)
    };
    let a = planted::bandit(11, Strategy::Quad, cfg.clone());
    let b = planted::bandit(11, Strategy::Quad, cfg.clone());
    let c = planted::bandit(12, Strategy::Quad, cfg.clone());
    assert_eq!(a.plan_round(0), b.plan_round(0));
    assert_ne!(
        a.plan_round(0),
        c.plan_round(0),
        "another seed samples other documents"
    );
    assert_ne!(
        a.plan_round(0),
        a.plan_round(1),
        "another round samples other documents"
    );
    // Serialisation round trip of the bandit (the membership stays where it is kept): the
    // same plan and the same continuation.
    let json = serde_json::to_string(&a.bandit).unwrap();
    let mut resumed = InMemoryBandit {
        bandit: serde_json::from_str::<Bandit>(&json).unwrap(),
        membership: a.membership.clone(),
    };
    let mut straight = a.clone();
    planted::run(&mut straight, 5);
    planted::run(&mut resumed, 5);
    assert_eq!(straight, resumed);

    // Until every document was taken: each is planned exactly once.
    let mut all = planted::bandit(11, Strategy::Quad, cfg);
    let rounds = planted::run(&mut all, 10_000);
    assert!(all.is_done());
    let mut seen = HashSet::new();
    for (pulls, _) in &rounds {
        for m in pulls.iter().flat_map(|p| &p.members) {
            assert!(seen.insert(m.loc), "{m:?} planned twice");
        }
    }
    assert_eq!(seen.len() as u64, all.pool_docs());
    assert!(all.plan_round(all.next_round()).is_empty(), "no arm left");
}

#[test]
fn the_budget_is_respected_to_within_one_document() {
    for (strategy, mode) in [
        (Strategy::Quad, TauMode::PerDocument),
        (Strategy::Quad, TauMode::Block),
        (Strategy::Exploit, TauMode::PerDocument),
        (Strategy::Explore, TauMode::PerDocument),
        (Strategy::TopkInfluence, TauMode::PerDocument),
    ] {
        for budget in [Budget::Tokens(5_000), Budget::Ratio(0.07)] {
            let cfg = BanditConfig {
                budget,
                mode,
                block_size: 30,
                ..BanditConfig::default()
            };
            let mut b = planted::bandit(5, strategy, cfg);
            let limit = b.budget_tokens();
            let rounds = planted::run(&mut b, 10_000);
            let taken: Vec<u64> = rounds
                .iter()
                .flat_map(|(_, o)| o.selected.iter().map(|(m, _)| m.tokens))
                .collect();
            let total: u64 = taken.iter().sum();
            assert_eq!(total, b.selected_tokens());
            let last = *taken.last().unwrap();
            assert!(
                total >= limit && total - last < limit,
                "{strategy:?} {mode:?} {budget:?}: {total} tokens for a budget of {limit}"
            );
        }
    }
}

/// Share of selected tokens that come from the good clusters.
fn good_share(selected: impl Iterator<Item = MemberRef>) -> f64 {
    let (mut good, mut all) = (0u64, 0u64);
    for m in selected {
        all += m.tokens;
        if planted::is_good(m.cluster) {
            good += m.tokens;
        }
    }
    good as f64 / all as f64
}

#[test]
fn quad_prefers_reference_like_clusters_and_still_tries_every_cluster() {
    let cfg = BanditConfig {
        budget: Budget::Ratio(0.15),
        ..BanditConfig::default()
    };
    let mut b = planted::bandit(21, Strategy::Quad, cfg);
    let budget = b.budget_tokens();
    let rounds = planted::run(&mut b, 10_000);
    let quad = good_share(
        rounds
            .iter()
            .flat_map(|(_, o)| o.selected.iter().map(|(m, _)| *m)),
    );

    // Random: a seeded shuffle of the pool, taken until the same budget.
    let mut pool: Vec<MemberRef> = planted::pool()
        .iter()
        .flat_map(|c| {
            c.members.iter().map(|m| MemberRef {
                cluster: c.id,
                loc: m.loc,
                tokens: m.tokens,
            })
        })
        .collect();
    pool.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(21));
    let mut used = 0;
    let random = good_share(pool.into_iter().take_while(|m| {
        let go = used < budget;
        used += m.tokens;
        go
    }));
    eprintln!("good-cluster share of selected tokens: quad {quad:.3}, random {random:.3}");
    assert!(quad >= 0.7, "quad took {quad:.3} from the good clusters");
    assert!(quad > random + 0.3, "quad {quad:.3} vs random {random:.3}");
    for (id, arm) in b.arms() {
        assert!(arm.own_pulls >= 1, "cluster {id} was never pulled");
    }
}

/// Standardised rewards and `tau_quantile` make the bandit's decisions independent of the
/// scores' scale: the planted pool scored as it is and scored x 1000 + 50 (another model or
/// normalisation) gives the same pulls and the same selection, round for round. Raw rewards
/// do not: against scores a thousand times larger, alpha's bonus no longer counts.
#[test]
fn standardised_rewards_make_the_bandit_blind_to_the_scores_scale() {
    let rounds = |reward: RewardScale, scale: f64, shift: f64| {
        let cfg = BanditConfig {
            reward,
            tau_quantile: Some(0.5),
            clusters_per_round: 2,
            budget: Budget::Ratio(0.15),
            ..BanditConfig::default()
        };
        let mut b = planted::bandit(5, Strategy::Quad, cfg);
        let mut out = Vec::new();
        while !b.is_done() && out.len() < 200 {
            let (pulls, outcome) =
                planted::step_scored_by(&mut b, |m| planted::influence(m) * scale + shift);
            let clusters: Vec<u32> = pulls.iter().map(|p| p.cluster).collect();
            let selected: Vec<MemberRef> = outcome.selected.iter().map(|(m, _)| *m).collect();
            out.push((clusters, selected));
        }
        out
    };
    let standard = rounds(RewardScale::Standardised, 1.0, 0.0);
    assert!(standard.len() > 10, "{} rounds", standard.len());
    assert_eq!(standard, rounds(RewardScale::Standardised, 1000.0, 50.0));
    assert_ne!(
        rounds(RewardScale::Raw, 1.0, 0.0),
        rounds(RewardScale::Raw, 1000.0, 50.0),
        "raw rewards: the scale changes the pulls"
    );
}

#[test]
fn exploit_always_pulls_the_best_mean_after_the_first_pulls() {
    let cfg = BanditConfig {
        clusters_per_round: 1,
        alpha: 5.0, // ignored: exploit is alpha = 0
        budget: Budget::Ratio(0.2),
        ..BanditConfig::default()
    };
    let mut b = planted::bandit(8, Strategy::Exploit, cfg);
    let mut round = 0;
    while !b.is_done() {
        let pulls = b.plan_round(round);
        if round >= u64::from(planted::CLUSTERS) {
            let open: HashSet<u32> = b
                .cluster_sizes()
                .iter()
                .filter(|c| c.2 > 0)
                .map(|c| c.0)
                .collect();
            let best = b
                .arms()
                .into_iter()
                .filter(|(id, _)| open.contains(id))
                .map(|(id, a)| (id, a.reward_sum / a.pulls as f64))
                .max_by(|x, y| x.1.total_cmp(&y.1).then(y.0.cmp(&x.0)))
                .unwrap();
            assert_eq!(pulls[0].cluster, best.0, "round {round}");
            assert!(planted::is_good(pulls[0].cluster));
        }
        planted::step(&mut b);
        round += 1;
    }
}

#[test]
fn explore_chooses_clusters_uniformly_and_takes_samples_unscored() {
    let cfg = BanditConfig {
        budget: Budget::Ratio(0.5),
        ..BanditConfig::default()
    };
    let mut b = planted::bandit(4, Strategy::Explore, cfg);
    let pulls = b.plan_round(0);
    assert!(pulls.iter().all(|p| !p.score));
    let err = b.observe(0, &scores_of(&pulls, |_| 1.0)).unwrap_err();
    assert!(matches!(err, BanditError::NotPlanned { .. }), "{err}");
    let mut chosen: BTreeMap<u32, u64> = BTreeMap::new();
    let mut round = 0;
    while !b.is_done() {
        let pulls = b.plan_round(round);
        for p in &pulls {
            *chosen.entry(p.cluster).or_insert(0) += 1;
        }
        let out = b.observe(round, &[]).unwrap();
        let planned: Vec<MemberRef> = pulls.iter().flat_map(|p| p.members.clone()).collect();
        let taken: Vec<MemberRef> = out
            .selected
            .iter()
            .map(|(m, v)| {
                assert_eq!(*v, None);
                *m
            })
            .collect();
        assert_eq!(
            taken,
            planned[..taken.len()],
            "sampled documents are taken as they are"
        );
        round += 1;
    }
    // ~50 rounds x 4 of 20 clusters: every cluster chosen, none far more than its share.
    assert_eq!(chosen.len() as u32, planted::CLUSTERS);
    let expected = chosen.values().sum::<u64>() as f64 / f64::from(planted::CLUSTERS);
    let hi = *chosen.values().max().unwrap() as f64;
    assert!(hi <= 2.5 * expected, "{chosen:?}");
}

#[test]
fn topk_scores_everything_and_takes_the_best() {
    let cfg = BanditConfig {
        budget: Budget::Ratio(0.1),
        ..BanditConfig::default()
    };
    let mut b = planted::bandit(2, Strategy::TopkInfluence, cfg);
    let rounds = planted::run(&mut b, 10_000);
    assert_eq!(b.scored_docs(), b.pool_docs(), "everything scored");
    let scored: Vec<(MemberRef, f64)> = rounds.iter().flat_map(|(_, o)| o.scored.clone()).collect();
    let selected: Vec<(MemberRef, Option<f64>)> = rounds
        .iter()
        .flat_map(|(_, o)| o.selected.clone())
        .collect();
    assert!(rounds[..rounds.len() - 1]
        .iter()
        .all(|(_, o)| o.selected.is_empty()));
    let picked: HashSet<DocLoc> = selected.iter().map(|(m, _)| m.loc).collect();
    let worst_taken = selected
        .iter()
        .map(|(_, v)| v.unwrap())
        .fold(f64::INFINITY, f64::min);
    let best_left = scored
        .iter()
        .filter(|(m, _)| !picked.contains(&m.loc))
        .map(|(_, v)| *v)
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(worst_taken >= best_left, "{worst_taken} < {best_left}");
}

#[test]
fn block_mode_takes_a_block_of_unscored_documents_when_the_sample_passes_tau() {
    let cfg = BanditConfig {
        mode: TauMode::Block,
        block_size: 15,
        clusters_per_round: 1,
        budget: Budget::Ratio(1.0),
        ..BanditConfig::default()
    };
    let mut b = planted::bandit(6, Strategy::Quad, cfg);
    for _ in 0..planted::CLUSTERS {
        let (pulls, out) = planted::step(&mut b);
        let reward = out.rewards[0].1;
        let unscored = out.selected.iter().filter(|(_, v)| v.is_none()).count();
        let passing = out.scored.iter().filter(|(_, v)| *v >= 0.0).count();
        assert_eq!(out.selected.len() - unscored, passing);
        assert_eq!(
            unscored,
            if reward >= 0.0 { 15 } else { 0 },
            "cluster {}",
            pulls[0].cluster
        );
        let sampled: HashSet<DocLoc> = pulls[0].members.iter().map(|m| m.loc).collect();
        for (m, v) in &out.selected {
            assert_eq!(v.is_some(), sampled.contains(&m.loc));
            assert!(b.is_selected(m.cluster, &m.loc));
        }
    }
}

#[test]
fn observe_checks_its_input() {
    let mut b = planted::bandit(1, Strategy::Quad, BanditConfig::default());
    let pulls = b.plan_round(0);
    let before = b.clone();
    assert!(matches!(
        b.observe(1, &[]),
        Err(BanditError::OutOfOrder { got: 1, want: 0 })
    ));
    let mut scores = scores_of(&pulls, planted::influence);
    scores.pop();
    assert!(matches!(
        b.observe(0, &scores),
        Err(BanditError::MissingScore { .. })
    ));
    assert_eq!(b, before, "a refused round changes nothing");
    b.observe(0, &scores_of(&pulls, planted::influence))
        .unwrap();
    assert_eq!(b.next_round(), 1);
}

/// A score that is not finite is no score: the member is sampled and rejected with the reason,
/// never selected, and left out of its cluster's reward; the round goes on.
#[test]
fn a_score_that_is_not_finite_rejects_the_document_not_the_round() {
    let cfg = BanditConfig {
        tau: -1e9, // every finite score passes
        ..config(2)
    };
    let mut b = InMemoryBandit::new(3, Strategy::Quad, cfg).unwrap();
    b.sync_clusters(&[
        small(0, vec![1.0, 0.0], 20, 10),
        small(1, vec![0.0, 1.0], 20, 10),
    ])
    .unwrap();
    let pulls = b.plan_round(0);
    let first = pulls[0].members[0];
    let mut scores = scores_of(&pulls, |_| 2.0);
    scores[0].1 = f64::NAN;
    scores[1].1 = f64::INFINITY;
    let second = scores[1].0;
    let out = b.observe(0, &scores).unwrap();
    let unscorable: Vec<MemberRef> = out.unscorable.iter().map(|(m, _)| *m).collect();
    assert_eq!(unscorable, vec![first, second]);
    assert!(
        out.unscorable[0].1.contains("not finite"),
        "{:?}",
        out.unscorable
    );
    assert!(out.selected.iter().all(|(m, _)| !unscorable.contains(m)));
    assert!(out.scored.iter().all(|(_, v)| v.is_finite()));
    assert_eq!(out.selected.len(), scores.len() - 2);
    assert!(
        out.rewards.iter().all(|(_, r)| *r == 2.0),
        "rewards are means of the finite scores: {:?}",
        out.rewards
    );
    assert!(
        out.sampled().contains(&first),
        "an unscorable member leaves the draw order"
    );
    // The next round goes on and never draws them again.
    let next = b.plan_round(1);
    assert!(next
        .iter()
        .flat_map(|p| &p.members)
        .all(|m| !unscorable.contains(m)));
}

/// The store's draw order is the in-memory one (the same draws, so the same rounds), a killed
/// loop resumes from the store to the uninterrupted end, and the store's unsampled counts and
/// pending rows follow the rounds.
#[test]
fn the_store_draws_like_memory_and_resumes_rounds_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let seed = 9;
    let fp = serde_json::json!({ "seed": seed });
    let cfg = BanditConfig {
        budget: Budget::Ratio(0.2),
        mode: TauMode::Block,
        block_size: 7,
        ..BanditConfig::default()
    };
    let mut memory = planted::bandit(seed, Strategy::Quad, cfg.clone());
    let in_memory = planted::run(&mut memory, 10_000);

    let straight_store = planted::store_with_pool(&dir.path().join("straight.redb"), seed, &fp);
    let mut straight = planted::bandit_from_store(&straight_store, seed, &cfg);
    let mut rounds = Vec::new();
    while !straight.is_done() {
        rounds.push(planted::store_round(&straight_store, &mut straight));
    }
    assert_eq!(rounds, in_memory, "store draws equal the in-memory draws");
    assert_eq!(straight, memory.bandit);
    let fresh: BTreeMap<u32, u64> = straight_store
        .clusters()
        .unwrap()
        .iter()
        .map(|c| (c.cluster, c.fresh))
        .collect();
    for (id, _, left) in straight.cluster_sizes() {
        assert_eq!(
            fresh[&id], left,
            "cluster {id}: unsampled count in the store"
        );
    }
    let pending = straight_store.pending_rows(|_| true).unwrap();
    let selected: usize = rounds.iter().map(|(_, o)| o.selected.len()).sum();
    assert_eq!(
        pending.len(),
        selected,
        "every selected row waits for its file"
    );

    let path = dir.path().join("killed.redb");
    {
        let store = planted::store_with_pool(&path, seed, &fp);
        let mut b = planted::bandit_from_store(&store, seed, &cfg);
        for _ in 0..3 {
            planted::store_round(&store, &mut b);
        }
    }
    // "Killed" here; reopen and go on from the stored state.
    let store = quad::state::StateStore::open(&path, &fp).unwrap();
    let mut resumed = planted::bandit_from_store(&store, seed, &cfg);
    assert_eq!(resumed.next_round(), 3);
    assert_eq!(store.round_records().unwrap().len(), 3);
    while !resumed.is_done() {
        planted::store_round(&store, &mut resumed);
    }
    assert_eq!(
        resumed, straight,
        "resumed loop ends where the uninterrupted one did"
    );
    assert_eq!(store.pending_rows(|_| true).unwrap(), pending);
}

//! `loupe experts`: every table exact against a brute-force count on a planted router
//! (`hook_expert_weights` over two corpus domains), the `hook_router_probs` + `--top-k` path, a
//! Monet dictionary trained on the tiny GPT-2 against a brute-force count of its `route()`, the
//! corpus checks, and bad input (one error line, the store byte-identical).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use loupe_dict::sae::{Sae, SaeSpec};
use loupe_store::{DType, ExpertsData, ExpertsSource, HookSpec, Store};
use loupe_tests::{assert_one_error, loupe, snapshot, stderr, tiny_model};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const WEIGHTS: &str = "blocks.0.mlp.hook_expert_weights";
const PROBS: &str = "blocks.1.mlp.hook_router_probs";
const N: usize = 6;
const DOCS: u32 = 4;
const DOC_LEN: usize = 60;
const BINS: usize = 40;

/// One token's routing as the planted store holds it.
struct Token {
    doc: u32,
    id: u32,
    /// The chosen experts and their gates.
    chosen: Vec<(u32, f32)>,
}

/// Per token 1–3 distinct experts with random gates (expert 5 always, and token ids 3–8, in
/// domain b = docs 2 and 3); the weights written dense, 0 for the experts not chosen.
fn planted_tokens() -> Vec<Token> {
    let mut rng = StdRng::seed_from_u64(23);
    let mut tokens = Vec::new();
    for doc in 0..DOCS {
        let b = doc >= 2;
        for _ in 0..DOC_LEN {
            let mut experts: Vec<u32> = (0..N as u32).collect();
            experts.shuffle(&mut rng);
            let k = rng.random_range(1..=3);
            let mut chosen: Vec<u32> = experts[..k].to_vec();
            if b && !chosen.contains(&5) {
                chosen[0] = 5;
            }
            chosen.sort();
            let chosen = chosen.into_iter().map(|e| (e, rng.random_range(0.05f32..1.0))).collect();
            let id = if b { rng.random_range(3..9) } else { rng.random_range(0..6) };
            tokens.push(Token { doc, id, chosen });
        }
    }
    tokens
}

/// A store with the planted weights at `WEIGHTS`, and router probabilities (a softmax of random
/// logits) at `PROBS`, over the same tokens; and a corpus of two domains, a/ (docs 0, 1) and b/
/// (docs 2, 3). Returns the probabilities written.
fn planted_store(dir: &Path, tokens: &[Token]) -> Vec<Vec<f32>> {
    let store = Store::create(dir.join("store")).unwrap();
    let spec = HookSpec { d: N as u32, dtype: DType::F32, grad: false };
    let mut rng = StdRng::seed_from_u64(7);
    let probs: Vec<Vec<f32>> = tokens
        .iter()
        .map(|_| {
            let e: Vec<f32> = (0..N).map(|_| rng.random_range(-2.0f32..2.0).exp()).collect();
            let sum: f32 = e.iter().sum();
            e.iter().map(|v| v / sum).collect()
        })
        .collect();
    for (hook, rows) in [
        (
            WEIGHTS,
            tokens
                .iter()
                .map(|t| {
                    let mut w = vec![0.0f32; N];
                    t.chosen.iter().for_each(|&(e, g)| w[e as usize] = g);
                    w
                })
                .collect::<Vec<_>>(),
        ),
        (PROBS, probs.clone()),
    ] {
        let mut writer = store.activation_writer(hook, spec).unwrap().with_shard_rows(97);
        let doc: Vec<u32> = tokens.iter().map(|t| t.doc).collect();
        let pos: Vec<u32> = (0..tokens.len()).map(|i| (i % DOC_LEN) as u32).collect();
        let id: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        writer.append::<f32>(&doc, &pos, &id, &rows.concat(), None).unwrap();
        writer.finish().unwrap();
    }
    for (folder, file, text) in
        [("a", "1.txt", "one"), ("a", "2.txt", "two"), ("b", "3.txt", "three"), ("b", "4.txt", "four")]
    {
        std::fs::create_dir_all(dir.join("corpus").join(folder)).unwrap();
        std::fs::write(dir.join("corpus").join(folder).join(file), text).unwrap();
        std::fs::create_dir_all(dir.join("one-domain/all")).unwrap();
        std::fs::write(dir.join("one-domain/all").join(file), text).unwrap();
    }
    probs
}

/// A token as the brute force sees it: domain, token id, chosen experts with their gates.
type Routed = (usize, u32, Vec<(u32, f32)>);

fn ratio(a: u64, b: u64) -> f32 {
    if b == 0 { 0.0 } else { (a as f64 / b as f64) as f32 }
}

fn entropy(gates: &[f64]) -> f64 {
    let sum: f64 = gates.iter().filter(|&&g| g > 0.0).sum();
    if sum <= 0.0 {
        return 0.0;
    }
    -gates.iter().filter(|&&g| g > 0.0).map(|g| g / sum).map(|p| p * p.ln()).sum::<f64>()
}

fn close(a: f32, b: f32, what: &str) {
    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{what}: {a} vs {b}");
}

/// Every table of `data` against a brute-force count of `routing` (per token: domain, token id,
/// chosen experts with gates), with `n` experts, `heat` heatmap experts, `top` partners, `vocab`
/// token ids, every used expert's partners counted (the budget fits them all).
fn check_tables(
    data: &ExpertsData,
    routing: &[Routed],
    n: usize,
    keep: (usize, usize, usize),
    two_domains: bool,
) {
    let (heat, top, vocab_top) = keep;
    let t = &data.tables;
    let total = routing.len() as u64;
    let n_domains = data.entry.domains.len();
    let mut tokens = vec![0u64; n];
    let mut gates = vec![0f64; n];
    let mut both = vec![vec![0u64; n]; n];
    let mut by_token: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    let mut token_total: BTreeMap<u32, u64> = BTreeMap::new();
    let mut domain = vec![vec![0u64; n_domains]; n];
    let mut domain_total = vec![0u64; n_domains];
    let mut hist = vec![0u64; BINS];
    let (mut active, mut h_sum) = (0u64, 0f64);
    let width = (n as f64).ln() / BINS as f64;
    for (d, id, chosen) in routing {
        domain_total[*d] += 1;
        *token_total.entry(*id).or_default() += 1;
        active += chosen.len() as u64;
        let h = entropy(&chosen.iter().map(|c| c.1 as f64).collect::<Vec<_>>());
        h_sum += h;
        hist[((h / width) as usize).min(BINS - 1)] += 1;
        for &(i, g) in chosen {
            tokens[i as usize] += 1;
            gates[i as usize] += g as f64;
            domain[i as usize][*d] += 1;
            *by_token.entry((i, *id)).or_default() += 1;
            for &(j, _) in chosen {
                if i != j {
                    both[i as usize][j as usize] += 1;
                }
            }
        }
    }
    assert_eq!(data.entry.settings.tokens, total);
    assert_eq!(data.entry.domain_tokens, domain_total);
    close(data.entry.mean_active, (active as f64 / total as f64) as f32, "mean active");
    close(data.entry.mean_entropy, (h_sum / total as f64) as f32, "mean entropy");
    assert_eq!(t.entropy.iter().map(|b| b.tokens).collect::<Vec<_>>(), hist, "entropy histogram");
    close(t.entropy[BINS - 1].hi, (n as f64).ln() as f32, "the histogram's top edge");

    // Vocabulary: each expert's top token ids.
    let mut vocab = Vec::new();
    for e in 0..n as u32 {
        let mut ids: Vec<(u32, u64)> =
            by_token.iter().filter(|(k, _)| k.0 == e).map(|(k, &c)| (k.1, c)).collect();
        ids.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for &(id, c) in ids.iter().take(vocab_top) {
            vocab.push((e, id, c, ratio(c, tokens[e as usize]), ratio(c, token_total[&id])));
        }
    }
    let got: Vec<_> =
        t.vocab.iter().map(|r| (r.expert, r.token, r.count, r.share_of_expert, r.share_of_token)).collect();
    assert_eq!(got, vocab, "vocabulary rows");

    // Domains.
    let mut domains = Vec::new();
    for e in 0..n {
        for d in 0..n_domains {
            if domain[e][d] > 0 {
                let spec = two_domains.then(|| ratio(domain[e][d], domain_total[d]));
                domains.push((e as u32, d as u16, domain[e][d], ratio(domain[e][d], tokens[e]), spec));
            }
        }
    }
    let got: Vec<_> = t
        .domains
        .iter()
        .map(|r| (r.expert, r.domain, r.count, r.share_of_expert, r.specialization))
        .collect();
    assert_eq!(got, domains, "domain rows");

    // Experts.
    assert_eq!(t.experts.len(), n);
    for (e, row) in t.experts.iter().enumerate() {
        assert_eq!((row.expert, row.tokens), (e as u32, tokens[e]), "expert {e}");
        assert_eq!(row.usage, ratio(tokens[e], total));
        let gate = if tokens[e] == 0 { 0.0 } else { (gates[e] / tokens[e] as f64) as f32 };
        close(row.mean_gate, gate, "mean gate");
        let first = vocab.iter().find(|v| v.0 == e as u32);
        assert_eq!(
            (row.top_token, row.top_token_share),
            first.map_or((0, 0.0), |v| (v.1, v.3)),
            "expert {e}"
        );
        let best = (0..n_domains)
            .filter(|&d| domain[e][d] > 0)
            .map(|d| (ratio(domain[e][d], domain_total[d]), d as u32))
            .fold(None, |b: Option<(f32, u32)>, x| if b.is_none_or(|b| x.0 > b.0) { Some(x) } else { b });
        if two_domains {
            assert_eq!(
                (row.top_domain_specialization, row.top_domain),
                (best.map(|b| b.0), best.map_or(0, |b| b.1))
            );
        } else {
            assert_eq!((row.top_domain_specialization, row.top_domain), (None, 0));
        }
    }

    // Co-activation: every pair among the `heat` most used, then each used expert's `top`
    // partners.
    let mut used: Vec<usize> = (0..n).filter(|&e| tokens[e] > 0).collect();
    used.sort_by(|&a, &b| tokens[b].cmp(&tokens[a]).then(a.cmp(&b)));
    let mut kept = BTreeSet::new();
    for &i in used.iter().take(heat) {
        for &j in used.iter().take(heat) {
            if i != j {
                kept.insert((i, j));
            }
        }
    }
    for &i in &used {
        let mut partners: Vec<usize> = (0..n).filter(|&j| j != i && both[i][j] > 0).collect();
        partners.sort_by(|&a, &b| both[i][b].cmp(&both[i][a]).then(a.cmp(&b)));
        kept.extend(partners.iter().take(top).map(|&j| (i, j)));
    }
    let mut expected: Vec<(u32, u32, u64, f32)> =
        kept.iter().map(|&(i, j)| (i as u32, j as u32, both[i][j], ratio(both[i][j], tokens[i]))).collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)).then(a.1.cmp(&b.1)));
    let got: Vec<_> =
        t.coactivation.iter().map(|r| (r.expert_i, r.expert_j, r.both, r.p_j_given_i)).collect();
    assert_eq!(got, expected, "co-activation rows");
}

fn run_ok(args: &[&str]) -> String {
    let out = loupe(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_planted_router_counts_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = planted_tokens();
    let probs = planted_store(tmp.path(), &tokens);
    let store = tmp.path().join("store");
    let (s, corpus) = (store.to_str().unwrap(), tmp.path().join("corpus"));
    let c = corpus.to_str().unwrap();
    let keep = ["--coactivation-experts", "3", "--coactivation-top", "2", "--vocab-top", "3"];
    let text = run_ok(&[&["experts", "--store", s, "--hook", WEIGHTS, "--corpus", c][..], &keep].concat());
    assert!(text.contains("6 experts, 240 tokens"), "{text}");
    assert!(text.contains("most domain-specialised"), "{text}");
    let data = Store::open(&store).unwrap().read_experts(WEIGHTS).unwrap().expect("listed");
    assert_eq!(data.entry.source, ExpertsSource::Hook { hook: WEIGHTS.into() });
    assert_eq!((data.entry.n_experts, data.entry.features_per_expert), (6, 0));
    assert_eq!(data.entry.domains, ["a", "b"]);
    assert_eq!((data.entry.settings.top_k, data.entry.mean_router_entropy), (None, None));
    let routing: Vec<_> = tokens.iter().map(|t| ((t.doc >= 2) as usize, t.id, t.chosen.clone())).collect();
    check_tables(&data, &routing, N, (3, 2, 3), true);
    // Expert 5 takes every token of domain b.
    let five = &data.tables.experts[5];
    assert_eq!((five.top_domain, five.top_domain_specialization), (1, Some(1.0)));

    // The router's probabilities with --top-k 2: the two largest, the gate the probability.
    let text = run_ok(
        &[&["experts", "--store", s, "--hook", PROBS, "--top-k", "2", "--corpus", c][..], &keep].concat(),
    );
    assert!(text.contains("(top-2)") && text.contains("full router softmax"), "{text}");
    let data = Store::open(&store).unwrap().read_experts(PROBS).unwrap().expect("listed");
    let routing: Vec<_> = tokens
        .iter()
        .zip(&probs)
        .map(|(t, p)| {
            let mut order: Vec<u32> = (0..N as u32).collect();
            order.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
            ((t.doc >= 2) as usize, t.id, order[..2].iter().map(|&e| (e, p[e as usize])).collect())
        })
        .collect();
    check_tables(&data, &routing, N, (3, 2, 3), true);
    assert_eq!(data.entry.settings.top_k, Some(2));
    let full: f64 = probs.iter().map(|p| entropy(&p.iter().map(|&v| v as f64).collect::<Vec<_>>())).sum();
    close(
        data.entry.mean_router_entropy.unwrap(),
        (full / tokens.len() as f64) as f32,
        "full-softmax entropy",
    );

    // One domain: the command succeeds, specialization is null and the summary says undefined.
    let one = tmp.path().join("one-domain");
    let text = run_ok(&[
        "experts",
        "--store",
        s,
        "--hook",
        WEIGHTS,
        "--corpus",
        one.to_str().unwrap(),
        "--name",
        "one",
    ]);
    assert!(text.contains("domain specialization: undefined (one domain: all)"), "{text}");
    let data = Store::open(&store).unwrap().read_experts("one").unwrap().expect("listed");
    assert!(!data.entry.has_domains());
    let routing: Vec<_> = tokens.iter().map(|t| (0, t.id, t.chosen.clone())).collect();
    check_tables(&data, &routing, N, (64, 8, 16), false);

    // Rows of one domain only (the first two documents): undefined as well.
    let text = run_ok(&[
        "experts",
        "--store",
        s,
        "--hook",
        WEIGHTS,
        "--corpus",
        c,
        "--max-tokens",
        "120",
        "--name",
        "a-only",
    ]);
    assert!(text.contains("undefined (the tokens counted are from one domain: a; of a, b)"), "{text}");
    let data = Store::open(&store).unwrap().read_experts("a-only").unwrap().expect("listed");
    assert_eq!(data.entry.domain_tokens, [120, 0]);
    let routing: Vec<_> = tokens[..120].iter().map(|t| (0, t.id, t.chosen.clone())).collect();
    check_tables(&data, &routing, N, (64, 8, 16), false);

    // Bad input: one error line each, the store byte-identical.
    let sae = Sae::init(SaeSpec { variant: loupe_dict::Variant::Topk, d_in: N, n_features: 8, k: 2 }, 1);
    loupe_tests::planted::commit_sae(&Store::open_rw(&store).unwrap(), "sae", &sae, WEIGHTS);
    let before = snapshot(&store);
    let bad = |args: &[&str], needle: &str| {
        assert_one_error(&store, &[&["experts", "--store", s][..], args].concat(), needle)
    };
    bad(&["--dictionary", "sae", "--corpus", c], "dictionary sae is a sae topk without experts");
    bad(&["--dictionary", "sae", "--corpus", c], "dictionaries with experts (monet, moex)");
    bad(&["--hook", PROBS, "--corpus", c], "pass --top-k K");
    bad(&["--hook", PROBS, "--top-k", "7", "--corpus", c], "--top-k 7 must be 1..=6");
    bad(&["--hook", WEIGHTS, "--top-k", "2", "--corpus", c], "--top-k is for hook_router_probs");
    bad(&["--hook", "blocks.0.hook_resid_post", "--corpus", c], "is not a router hook");
    bad(
        &["--hook", "blocks.3.mlp.hook_router_logits", "--top-k", "2", "--corpus", c],
        "has no activations for hook",
    );
    bad(&["--hook", WEIGHTS], "the store records no capture corpus: pass --corpus");
    bad(&["--hook", WEIGHTS, "--corpus", "/nonexistent/corpus"], "corpus not found");
    bad(&["--hook", WEIGHTS, "--corpus", &format!("{c}/a")], "document 2 is beyond the 2 documents");
    bad(&["--hook", WEIGHTS, "--corpus", c, "--name", "a/b"], "invalid entry name");
    bad(&["--corpus", c], "pass --dictionary D");
    assert!(before == snapshot(&store), "a refused `experts` changed the store");
}

/// A Monet dictionary trained on the tiny GPT-2's activations over a two-domain corpus.
#[test]
fn a_monet_dictionary_agrees_with_its_route() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    std::fs::write(model.join("tokenizer_config.json"), r#"{"bos_token": "\u0000"}"#).unwrap();
    let corpus = tmp.path().join("corpus");
    for (folder, word) in [("moby-dick", "whale sea ship "), ("sotu", "nation law tax ")] {
        std::fs::create_dir_all(corpus.join(folder)).unwrap();
        for i in 0..3 {
            let text: String = (0..60).map(|j| format!("{word}{} ", (i * 7 + j) % 11)).collect();
            std::fs::write(corpus.join(folder).join(format!("{i}.txt")), text).unwrap();
        }
    }
    let store = tmp.path().join("store");
    let (s, hook) = (store.to_str().unwrap(), "blocks.0.hook_resid_post");
    let model_arg = model.to_str().unwrap();
    let corpus_arg = corpus.to_str().unwrap();
    run_ok(&[
        "capture",
        "--model",
        model_arg,
        "--corpus",
        corpus_arg,
        "--store",
        s,
        "--hook",
        hook,
        "--context",
        "32",
        "--max-tokens",
        "4000",
    ]);
    run_ok(&[
        "train-monet",
        "--store",
        s,
        "--hook",
        hook,
        "--dictionary",
        "m",
        "--experts",
        "16",
        "--heads",
        "2",
        "--topk",
        "2",
        "--dim",
        "8",
        "--batch",
        "128",
        "--tokens",
        "2560",
        "--eval-contexts",
        "0",
    ]);
    let text = run_ok(&["experts", "--store", s, "--dictionary", "m"]);
    assert!(text.contains("256 experts"), "{text}");

    // Brute force: route every row at once and count.
    let opened = Store::open(&store).unwrap();
    let (_, dict) = loupe_dict::open_in_store(&opened, "m").unwrap();
    let layout = dict.experts().unwrap();
    let acts = opened.activations(hook).unwrap();
    let d = acts.spec().d as usize;
    let (mut x, mut docs, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..acts.num_shards() {
        let shard = acts.open_shard(i).unwrap();
        shard.act().rows(0..shard.rows(), d).to_f32_into(&mut x);
        docs.extend_from_slice(shard.doc());
        ids.extend_from_slice(shard.token());
    }
    let codes = dict.route(&x).unwrap();
    let routing: Vec<_> = (0..codes.tokens())
        .map(|t| {
            let (e, g) = codes.row(t);
            ((docs[t] >= 3) as usize, ids[t], e.iter().copied().zip(g.iter().copied()).collect::<Vec<_>>())
        })
        .collect();
    let data = opened.read_experts("m").unwrap().expect("listed");
    assert_eq!(
        data.entry.source,
        ExpertsSource::Dictionary { name: "m".into(), kind: "monet".into(), hook: hook.into() }
    );
    assert_eq!((data.entry.n_experts as usize, data.entry.features_per_expert), (layout.n_experts, 1));
    assert_eq!(data.entry.domains, ["moby-dick", "sotu"]);
    check_tables(&data, &routing, layout.n_experts, (64, 8, 16), true);
    drop(opened);

    // The corpus: moved (found again with --corpus), edited (refused), gone (refused).
    let moved = tmp.path().join("moved");
    std::fs::rename(&corpus, &moved).unwrap();
    let before = snapshot(&store);
    fn args<'a>(s: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        [&["experts", "--store", s, "--dictionary", "m"][..], extra].concat()
    }
    assert_one_error(&store, &args(s, &[]), "corpus not found");
    assert_one_error(&store, &args(s, &[]), "pass --corpus");
    let original = std::fs::read(moved.join("sotu/0.txt")).unwrap();
    std::fs::write(moved.join("sotu/0.txt"), "edited").unwrap();
    assert_one_error(
        &store,
        &args(s, &["--corpus", moved.to_str().unwrap()]),
        "has changed since the capture",
    );
    assert!(before == snapshot(&store), "a refused `experts` changed the store");
    std::fs::write(moved.join("sotu/0.txt"), original).unwrap();
    std::fs::rename(&moved, &corpus).unwrap();

    // Removing the dictionary removes its expert tables.
    run_ok(&["experts", "--store", s, "--dictionary", "m", "--name", "m-again", "--max-tokens", "100"]);
    assert_eq!(Store::open(&store).unwrap().experts_names(), ["m", "m-again"]);
    run_ok(&["store", "remove-dictionary", s, "m"]);
    assert!(Store::open(&store).unwrap().experts_names().is_empty());
    run_ok(&["store", "verify", s]);
}

//! Splicing a dictionary into a model (CE-loss recovered, KL) on the tiny GPT-2 fixture: a
//! dictionary that reconstructs exactly recovers everything, one that outputs zeros nothing.

use std::sync::Arc;

use loupe_dict::splice::{contexts_from_rows, eval_splice};
use loupe_dict::{Codes, Dictionary};
use loupe_model as model;

/// A "dictionary" with one feature per dimension: `scale = 1` reconstructs exactly, 0 gives zeros.
struct Scaled {
    d: usize,
    scale: f32,
}

impl Dictionary for Scaled {
    fn d_in(&self) -> usize {
        self.d
    }
    fn n_features(&self) -> usize {
        self.d
    }
    fn encode(&self, x: &[f32]) -> Codes {
        let rows: Vec<Vec<(u32, f32)>> =
            x.chunks(self.d).map(|r| r.iter().enumerate().map(|(i, v)| (i as u32, *v)).collect()).collect();
        Codes::from_rows(rows.iter().map(Vec::as_slice))
    }
    fn reconstruct(&self, x: &[f32]) -> (Codes, Vec<f32>) {
        let codes = self.encode(x);
        let eye: Vec<f32> =
            (0..self.d * self.d).map(|i| if i % (self.d + 1) == 0 { self.scale } else { 0.0 }).collect();
        let mut out = vec![0.0; x.len()];
        codes.decode_into(&eye, self.d, None, &mut out);
        (codes, out)
    }
    fn save(&self, _: &std::path::Path) -> anyhow::Result<()> {
        anyhow::bail!("not saved")
    }
}

#[test]
fn exact_reconstruction_recovers_all_and_zeros_recover_nothing() {
    let model = model::load(&loupe_tests::fixture("gpt2-tiny")).unwrap();
    let d = model.config().d_model;
    let vocab = model.config().vocab_size as u32;
    let contexts: Vec<Vec<u32>> =
        (0..3).map(|c| (0..20).map(|i| (i * 7 + c * 13) % vocab).collect()).collect();
    let hook = "blocks.0.hook_resid_post";
    let exact =
        eval_splice(model.as_ref(), Arc::new(Scaled { d, scale: 1.0 }), hook, None, &contexts).unwrap();
    assert_eq!(exact.tokens, 3 * 18);
    assert!((exact.ce_spliced - exact.ce_clean).abs() < 1e-5, "{exact:?}");
    assert!(exact.kl.abs() < 1e-5, "{exact:?}");
    assert!((exact.ce_loss_recovered - 1.0).abs() < 1e-3, "{exact:?}");
    // (The fixture's weights are random, so zero ablation may even lower the loss; it must change it.)
    assert!((exact.ce_zero_ablation - exact.ce_clean).abs() > 1e-3, "{exact:?}");
    let zero =
        eval_splice(model.as_ref(), Arc::new(Scaled { d, scale: 0.0 }), hook, None, &contexts).unwrap();
    assert!(zero.ce_loss_recovered.abs() < 1e-3, "{zero:?}");
    assert!(zero.kl > 0.0);
    let half =
        eval_splice(model.as_ref(), Arc::new(Scaled { d, scale: 0.5 }), hook, None, &contexts).unwrap();
    assert!(half.kl > 0.0 && half.kl < zero.kl * 10.0);
    let err = eval_splice(
        model.as_ref(),
        Arc::new(Scaled { d, scale: 1.0 }),
        "blocks.0.hook_nope",
        None,
        &contexts,
    );
    assert!(err.unwrap_err().to_string().contains("no hook"));
}

/// A transcoder reads its input hook in the same forward pass: replacing resid_post by an exact
/// copy of resid_mid is the same intervention as zeroing the MLP's output (resid_post = resid_mid
/// + mlp_out), so both splices give the same loss.
#[test]
fn a_transcoder_reads_its_input_hook_in_the_same_pass() {
    let model = model::load(&loupe_tests::fixture("gpt2-tiny")).unwrap();
    let d = model.config().d_model;
    let vocab = model.config().vocab_size as u32;
    let contexts: Vec<Vec<u32>> =
        (0..3).map(|c| (0..20).map(|i| (i * 5 + c * 11) % vocab).collect()).collect();
    let copy = Arc::new(Scaled { d, scale: 1.0 });
    let as_transcoder = eval_splice(
        model.as_ref(),
        copy,
        "blocks.0.hook_resid_post",
        Some("blocks.0.hook_resid_mid"),
        &contexts,
    )
    .unwrap();
    let no_mlp = eval_splice(
        model.as_ref(),
        Arc::new(Scaled { d, scale: 0.0 }),
        "blocks.0.hook_mlp_out",
        None,
        &contexts,
    )
    .unwrap();
    assert!((as_transcoder.ce_spliced - no_mlp.ce_spliced).abs() < 1e-4, "{as_transcoder:?} vs {no_mlp:?}");
    assert!((as_transcoder.ce_spliced - as_transcoder.ce_clean).abs() > 1e-4, "the MLP must matter");
}

#[test]
fn contexts_are_rebuilt_from_stored_rows() {
    // doc 0 positions 5..9, doc 1 positions 0..2, doc 1 position 7 (a gap).
    let doc = [0, 0, 0, 0, 1, 1, 1];
    let pos = [5, 6, 7, 8, 0, 1, 7];
    let token = [10, 11, 12, 13, 20, 21, 22];
    let ctx = contexts_from_rows(&doc, &pos, &token, 2, 3, 10);
    assert_eq!(ctx, vec![vec![2, 10, 11], vec![2, 12, 13], vec![2, 20, 21], vec![2, 22]]);
    assert_eq!(contexts_from_rows(&doc, &pos, &token, 2, 3, 2).len(), 2);
}

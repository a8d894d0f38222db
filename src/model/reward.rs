//! A reward model: the decoder's backbone with a scalar `score` head, laid out as transformers'
//! `Qwen3ForSequenceClassification` (`Qwen3MoeForSequenceClassification` for MoE) with
//! `num_labels = 1`.
//!
//! As there, the score of a sequence is `score · h_last` (no bias), where `h_last` is the final
//! (normed) hidden state of the row's *last non-pad token*: the rightmost position whose id is not
//! `pad_token_id`. The backbone's LM head is never used, so it is neither trained nor saved (a
//! saved folder holds `model.*` and `score.weight`, exactly the keys transformers expects).

use super::{normal_vec, MiniMind, ModelConfig};
use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use std::path::Path;

/// Key of the head's weight, `[1, hidden]`.
pub const SCORE_WEIGHT: &str = "score.weight";

/// A backbone plus a scalar head.
pub struct RewardModel {
    backbone: MiniMind,
    /// The config written to `config.json` (the backbone is built tied, see [`Self::from_tensors`]).
    cfg: ModelConfig,
    score: Tensor,
    params: Vec<(String, Var)>,
    pad_id: u32,
}

impl RewardModel {
    /// A reward model from named tensors in Qwen3 keys: the backbone's `model.*` weights, and
    /// `score.weight` if present (a reward model); without it (a causal LM) the head starts at
    /// N(0, 0.02) drawn from `seed`, as transformers initialises it. An `lm_head.weight` is
    /// dropped. `pad_id` is the id padding rows carry (it decides which token is last).
    pub fn from_tensors(
        cfg: &ModelConfig,
        mut tensors: std::collections::HashMap<String, Tensor>,
        device: &Device,
        trainable: bool,
        seed: u64,
        pad_id: u32,
    ) -> anyhow::Result<Self> {
        let c = cfg.hidden_size;
        let score = match tensors.remove(SCORE_WEIGHT) {
            Some(t) => {
                anyhow::ensure!(t.dims() == [1, c], "`{SCORE_WEIGHT}` has shape {:?}, expected [1, {c}]", t.dims());
                t.to_dtype(DType::F32)?.to_device(device)?
            }
            None => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                Tensor::from_vec(normal_vec(&mut rng, c, 0.02), (1, c), device)?
            }
        };
        tensors.remove("lm_head.weight");
        // The head of a causal LM is irrelevant here: building the backbone as tied means an
        // untied model's `lm_head` is neither required nor a trainable parameter without gradient.
        let mut backbone_cfg = cfg.clone();
        backbone_cfg.tie_word_embeddings = true;
        let backbone = MiniMind::from_tensors(&backbone_cfg, tensors, device, trainable)?;
        let mut params = backbone.params().to_vec();
        let score = if trainable {
            let v = Var::from_tensor(&score)?;
            let t = v.as_tensor().clone();
            params.push((SCORE_WEIGHT.to_string(), v));
            t
        } else {
            score
        };
        Ok(Self { backbone, cfg: cfg.clone(), score, params, pad_id })
    }

    /// Load a model folder (`config.json` + `model.safetensors`): a causal LM (the head is
    /// initialised from `seed`) or a reward model (its head is kept).
    pub fn load_dir(dir: &Path, device: &Device, trainable: bool, seed: u64, pad_id: u32) -> anyhow::Result<Self> {
        let cfg = super::weights::load_config(dir)?;
        let path = dir.join("model.safetensors");
        let tensors = super::weights::load_tensors(&path, device)?;
        Self::from_tensors(&cfg, tensors, device, trainable, seed, pad_id)
            .with_context(|| format!("loading a reward model from {}", dir.display()))
    }

    /// The backbone (to set its compute dtype, or read its config).
    pub fn backbone_mut(&mut self) -> &mut MiniMind {
        &mut self.backbone
    }

    /// The model's config (as written to `config.json`).
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device.
    pub fn device(&self) -> &Device {
        self.backbone.device()
    }

    /// Trainable tensors: the backbone's, then `score.weight` (empty when frozen).
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The index of each row's last non-pad token (0 for a row of padding only), as
    /// transformers computes it: the rightmost position whose id is not the pad id.
    pub fn last_tokens(&self, ids: &[u32], seq_len: usize) -> Vec<u32> {
        ids.chunks(seq_len.max(1)).map(|row| row.iter().rposition(|&t| t != self.pad_id).unwrap_or(0) as u32).collect()
    }

    /// Scores `[B]` (f32) of right-padded rows `ids: [B, T]`, and the MoE aux loss (0 unless
    /// `train` and MoE).
    pub fn scores(&self, ids: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let (b, t) = ids.dims2()?;
        let host: Vec<u32> = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        let rows: Vec<u32> =
            self.last_tokens(&host, t).into_iter().enumerate().map(|(r, i)| (r * t) as u32 + i).collect();
        let (h, aux) = self.backbone.forward_hidden(ids, None, 0, None, train)?;
        let c = self.cfg.hidden_size;
        let last = h.reshape((b * t, c))?.index_select(&Tensor::new(rows, h.device())?, 0)?; // [B, C]
        let s = last.to_dtype(DType::F32)?.matmul(&self.score.t()?)?.squeeze(1)?;
        Ok((s, aux))
    }

    /// The head at every position: `[B, T]` (f32) values of `ids: [B, T]`, and the MoE aux loss.
    pub fn position_scores(&self, ids: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let (h, aux) = self.backbone.forward_hidden(ids, None, 0, None, train)?;
        let s = h.to_dtype(DType::F32)?.broadcast_matmul(&self.score.t()?)?.squeeze(2)?;
        Ok((s, aux))
    }

    /// Write the folder transformers loads with `AutoModelForSequenceClassification`: config
    /// (`Qwen3ForSequenceClassification`, `num_labels = 1`, this model's pad id), the weights
    /// (`model.*` and `score.weight`), and the tokenizer files of `tokenizer_dir`.
    pub fn export(&self, tokenizer_dir: Option<&Path>, out_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
        let mut cfg = self.cfg.to_hf_json();
        let o = cfg.as_object_mut().expect("config is an object");
        let arch =
            if self.cfg.use_moe { "Qwen3MoeForSequenceClassification" } else { "Qwen3ForSequenceClassification" };
        o.insert("architectures".into(), serde_json::json!([arch]));
        o.insert("num_labels".into(), 1.into());
        o.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
        o.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        o.insert("pad_token_id".into(), self.pad_id.into());
        let cfg_path = out_dir.join("config.json");
        crate::durable::write_atomic(&cfg_path, (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes())
            .with_context(|| format!("writing {}", cfg_path.display()))?;
        let mut named: Vec<(String, Tensor)> =
            self.backbone.named_tensors().into_iter().filter(|(n, _)| n != "lm_head.weight").collect();
        named.push((SCORE_WEIGHT.to_string(), self.score.clone()));
        super::weights::save_tensors(&named, &out_dir.join("model.safetensors"))?;
        if let Some(tdir) = tokenizer_dir {
            super::weights::copy_tokenizer_files(tdir, out_dir)?;
        }
        Ok(())
    }
}

/// Key of the critic's value-head bias (the reference's `value_head = nn.Linear(C, 1)` has one).
pub const VALUE_BIAS: &str = "value_head.bias";

/// PPO's critic (spec §12): a backbone and a linear value head (`score.weight` plus a bias) read at
/// every position. Built from a reward model (its backbone and head: the initial values are the
/// reward model's scores) or from a causal LM (head drawn as a reward model's, see
/// [`RewardModel::from_tensors`]); the bias starts at 0. The head reads the final normed hidden
/// state once (the reference normalises it a second time, spec §18 item 13, a bug).
pub struct Critic {
    model: RewardModel,
    bias: Var,
    params: Vec<(String, Var)>,
}

impl Critic {
    /// A critic from a trainable reward model.
    pub fn new(model: RewardModel) -> Result<Self> {
        if model.params().is_empty() {
            candle_core::bail!("a critic is trained: build it from a trainable reward model");
        }
        let bias = Var::zeros(1, DType::F32, model.device())?;
        let mut params = model.params().to_vec();
        params.push((VALUE_BIAS.to_string(), bias.clone()));
        Ok(Self { model, bias, params })
    }

    /// Trainable tensors: the backbone's, `score.weight`, then the bias.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Values `[B, T]` (f32) at every position of `ids: [B, T]`, and the MoE aux loss.
    pub fn values(&self, ids: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let (s, aux) = self.model.position_scores(ids, train)?;
        Ok((s.broadcast_add(self.bias.as_tensor())?, aux))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{ids, tiny};

    fn model(tied: bool) -> (MiniMind, RewardModel) {
        let mut cfg = tiny(false);
        cfg.tie_word_embeddings = tied;
        let lm = MiniMind::new(&cfg, 3, &Device::Cpu).unwrap();
        let named = lm.named_tensors().into_iter().collect();
        let rm = RewardModel::from_tensors(&cfg, named, &Device::Cpu, true, 5, 0).unwrap();
        (lm, rm)
    }

    #[test]
    fn the_last_non_pad_token_is_scored_and_padding_changes_nothing() {
        let (lm, rm) = model(false);
        assert_eq!(rm.last_tokens(&[4, 5, 0, 0, 7, 0, 8, 9, 0, 0, 0, 0], 4), vec![1, 3, 0]);
        // One row alone, and the same row right-padded next to a longer one: same score.
        let a: Vec<u32> = vec![3, 9, 4, 7];
        let b: Vec<u32> = vec![5, 6, 2, 8, 11, 12];
        let alone = rm.scores(&Tensor::from_vec(a.clone(), (1, 4), &Device::Cpu).unwrap(), false).unwrap().0;
        let mut padded = a.clone();
        padded.extend([0, 0]);
        padded.extend(&b);
        let both = rm.scores(&Tensor::from_vec(padded, (2, 6), &Device::Cpu).unwrap(), false).unwrap().0;
        let (x, y) = (alone.to_vec1::<f32>().unwrap()[0], both.to_vec1::<f32>().unwrap()[0]);
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        // By hand: score · (final hidden state at the last token).
        let (h, _) =
            lm.forward_hidden(&Tensor::from_vec(a, (1, 4), &Device::Cpu).unwrap(), None, 0, None, false).unwrap();
        let h = h.squeeze(0).unwrap().get(3).unwrap();
        let w = rm.score.squeeze(0).unwrap();
        let want = (h * w).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((want - x).abs() < 1e-5, "{want} vs {x}");
    }

    #[test]
    fn every_parameter_and_the_head_get_gradients_and_export_round_trips() {
        for tied in [true, false] {
            let (_, rm) = model(tied);
            assert_eq!(rm.params().last().unwrap().0, SCORE_WEIGHT);
            assert!(rm.params().iter().all(|(n, _)| n != "lm_head.weight"));
            let (s, _) = rm.scores(&ids(2, 6, 50, 1), true).unwrap();
            let g = s.sum_all().unwrap().backward().unwrap();
            for (n, v) in rm.params() {
                assert!(g.get(v.as_tensor()).is_some(), "no gradient for {n}");
            }
            let dir = tempfile::tempdir().unwrap();
            rm.export(None, dir.path()).unwrap();
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
            assert_eq!(cfg["architectures"][0], "Qwen3ForSequenceClassification");
            assert_eq!(cfg["num_labels"], 1);
            assert_eq!(cfg["tie_word_embeddings"], tied);
            let st = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
            assert_eq!(st[SCORE_WEIGHT].dims(), &[1, 32]);
            assert!(!st.contains_key("lm_head.weight"));
            let back = RewardModel::load_dir(dir.path(), &Device::Cpu, false, 99, 0).unwrap();
            let x = ids(2, 6, 50, 4);
            let d = (rm.scores(&x, false).unwrap().0 - back.scores(&x, false).unwrap().0)
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "a reloaded reward model scores differently");
        }
    }
}

//! Tiny real models for tests of chat, serve and the web page: a scripted one whose greedy answer
//! is known, and a random one that talks until its token budget. Not part of the public API.

/// The tokenizer of the test models below: a byte-level BPE trained on a few words, with the
/// MiniMind special tokens, plus `pieces` as added tokens (so each piece is one id).
fn test_tokenizer(pieces: &[&str]) -> anyhow::Result<tokenizers::Tokenizer> {
    let texts: Vec<String> = (0..50).map(|i| format!("hello world {i} what is the answer")).collect();
    let mut tok = crate::stages::tokenizer::train(&texts, 320)?;
    let added: Vec<tokenizers::AddedToken> = pieces
        .iter()
        .filter(|p| tok.token_to_id(p).is_none())
        .map(|p| tokenizers::AddedToken::from(p.to_string(), false))
        .collect();
    tok.add_tokens(&added);
    Ok(tok)
}

/// Write a model folder (`config.json`, `model.safetensors`, tokenizer files with the reference
/// chat template) for `tok` and the weights `tensors` builds from the spec list.
fn write_model_dir(
    dir: &std::path::Path,
    tok: &tokenizers::Tokenizer,
    hidden: usize,
    tensors: impl Fn(&str, &[usize], crate::model::Init, &mut rand_chacha::ChaCha8Rng) -> Vec<f32>,
) -> anyhow::Result<crate::model::ModelConfig> {
    use rand::SeedableRng;
    std::fs::create_dir_all(dir)?;
    let mut cfg = crate::model::ModelConfig::dense(hidden, 1, 4, 2);
    cfg.vocab_size = tok.get_vocab_size(true);
    cfg.tie_word_embeddings = false;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let named: Vec<(String, candle_core::Tensor)> = crate::model::param_specs(&cfg)
        .into_iter()
        .map(|(name, shape, init)| {
            let data = tensors(&name, &shape, init, &mut rng);
            let t = candle_core::Tensor::from_vec(data, shape, &candle_core::Device::Cpu)?;
            Ok((name, t))
        })
        .collect::<anyhow::Result<_>>()?;
    crate::model::weights::save_tensors(&named, &dir.join("model.safetensors"))?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg.to_hf_json())?)?;
    tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&crate::stages::tokenizer::reference_config())?,
    )?;
    Ok(cfg)
}

/// A tiny real MiniMind whose greedy answer to every chat prompt (thinking on or off) is
/// `script` (each piece becomes one token) followed by `<|im_end|>`: attention and MLP outputs
/// are zero, so the next token depends on the current one only, and the LM head maps each
/// token of the chain to the next. Tests use it to get exact, known answers through the real
/// engine, tokenizer and chat template.
pub fn script_model(dir: &std::path::Path, script: &[&str]) -> anyhow::Result<()> {
    use rand::Rng;
    let tok = test_tokenizer(script)?;
    let id = |p: &str| tok.token_to_id(p).ok_or_else(|| anyhow::anyhow!("no token for {p:?}"));
    // The tokens chat prompts end with (generation prompt with the think block closed / open).
    let tt = crate::data::tokenize::TextTokenizer::new(tok.clone(), crate::data::chat::ChatTemplate::reference())?;
    let msgs = [crate::data::read::Message::new("user", "hi")];
    let mut chain: Vec<(u32, u32)> = vec![];
    let first = id(script[0])?;
    for open in [false, true] {
        let p = tt.prompt(&msgs, open)?;
        chain.push((*p.last().expect("non-empty prompt"), first));
    }
    for w in script.windows(2) {
        chain.push((id(w[0])?, id(w[1])?));
    }
    chain.push((id(script[script.len() - 1])?, tt.eos));
    let hidden = 128;
    let vocab = tok.get_vocab_size(true);
    // Random unit embeddings: nearly orthogonal in 128 dimensions.
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
    let embed: Vec<Vec<f32>> = (0..vocab)
        .map(|_| {
            let v: Vec<f32> = (0..hidden).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect()
        })
        .collect();
    let mut head = vec![0f32; vocab * hidden];
    for &(from, to) in &chain {
        for (j, e) in embed[from as usize].iter().enumerate() {
            head[to as usize * hidden + j] += 4.0 * e;
        }
    }
    write_model_dir(dir, &tok, hidden, |name, shape, init, rng| {
        let n: usize = shape.iter().product();
        if name == "model.embed_tokens.weight" {
            embed.concat()
        } else if name == "lm_head.weight" {
            head.clone()
        } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            vec![0.0; n]
        } else if init == crate::model::Init::Ones {
            vec![1.0; n]
        } else {
            (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect()
        }
    })?;
    Ok(())
}

/// A tiny real MiniMind with large random weights: greedy answers are long, deterministic
/// noise that never ends by itself (the special tokens' logits are zero while the others spread
/// widely), so tests control the length with `max_tokens`.
pub fn random_model(dir: &std::path::Path) -> anyhow::Result<()> {
    use rand::Rng;
    let tok = test_tokenizer(&[])?;
    let specials = crate::stages::tokenizer::SPECIAL_TOKENS.len();
    write_model_dir(dir, &tok, 64, |name, shape, init, rng| {
        let n: usize = shape.iter().product();
        if init == crate::model::Init::Ones {
            return vec![1.0; n];
        }
        let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect();
        if name == "lm_head.weight" {
            v[..specials * shape[1]].iter_mut().for_each(|x| *x = 0.0);
        }
        v
    })?;
    Ok(())
}

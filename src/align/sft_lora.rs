//! Supervised fine-tuning of LoRA adapters on a frozen base (spec §10): the same token loss and
//! masks as SFT, through the shared training loop, with only the adapter tensors trainable.

use crate::cancel::CancelToken;
use crate::model::lora::LoraAdapters;
use crate::model::MiniMind;
use crate::train::trainer::LossOutput;
use crate::train::{train, Batch, BatchSource, TrainOptions, TrainSummary};

/// Train `adapters` (attached to `model`, whose base must be frozen) on `data` with the masked
/// next-token cross-entropy plus the MoE aux loss. Dropout masks are seeded from each batch's
/// content, so an interrupted run resumes bit-identically.
pub fn train_lora(
    model: &MiniMind,
    adapters: &LoraAdapters,
    data: &dyn BatchSource,
    opts: &TrainOptions,
    cancel: &CancelToken,
) -> anyhow::Result<TrainSummary> {
    anyhow::ensure!(
        model.params().is_empty(),
        "lora: the base model must be loaded frozen (trainable = false) so only adapters train"
    );
    let device = model.device().clone();
    let params = adapters.params();
    adapters.set_training(true);
    let r = train(&params, data, opts, cancel, |b: &Batch| {
        adapters.reseed_dropout(b.seed(opts.seed));
        let docs = b.doc_positions()?;
        let (loss, aux) =
            model.forward_train_packed(&b.input_tensor(&device)?, &b.label_tensor(&device)?, docs.as_ref())?;
        Ok(LossOutput { loss: (loss + &aux)?, aux: Some(aux) })
    });
    adapters.set_training(false);
    r
}

#[cfg(test)]
mod tests;

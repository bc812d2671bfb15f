//! Hugging Face tensor names and the model part each belongs to, so that checkpoints can be cut
//! into stages by name alone.

use pp_stages::Partition;

/// The token embedding (also the output weight of a model with tied embeddings).
pub const EMBED: &str = "model.embed_tokens.weight";
/// The output projection of an untied model.
pub const LM_HEAD: &str = "lm_head.weight";
/// Prefix of the final norm's tensors.
pub const FINAL_NORM: &str = "model.norm";

/// The part of the model a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The token embedding.
    Embedding,
    /// Decoder layer `n`.
    Layer(usize),
    /// Final norm and output projection.
    Head,
}

impl Part {
    /// The part that owns the tensor `name`: anything under `model.layers.N.` belongs to layer
    /// N (including buffers such as old checkpoints' `rotary_emb.inv_freq`), the final norm and
    /// `lm_head` to the head, and everything else to the embedding's stage.
    pub fn of(name: &str) -> Part {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            if let Some(Ok(layer)) = rest.split('.').next().map(str::parse) {
                return Part::Layer(layer);
            }
        }
        if name == LM_HEAD || name.starts_with(&format!("{FINAL_NORM}.")) {
            Part::Head
        } else {
            Part::Embedding
        }
    }

    /// The stages that hold the tensor `name` under `partition`: one, except for a tied
    /// embedding, which both the first stage (as input table) and the last (as output weight)
    /// hold when they differ.
    pub fn stages_holding(name: &str, partition: &Partition, tied: bool) -> Vec<usize> {
        let last = partition.len() - 1;
        match Part::of(name) {
            Part::Embedding if tied && name == EMBED && last != 0 => vec![0, last],
            Part::Embedding => vec![0],
            Part::Head => vec![last],
            Part::Layer(layer) => vec![partition.stage_of_layer(layer).unwrap_or(last)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_parts() {
        assert_eq!(Part::of(EMBED), Part::Embedding);
        assert_eq!(
            Part::of("model.layers.12.mlp.up_proj.weight"),
            Part::Layer(12)
        );
        assert_eq!(
            Part::of("model.layers.3.self_attn.rotary_emb.inv_freq"),
            Part::Layer(3)
        );
        assert_eq!(Part::of("model.norm.weight"), Part::Head);
        assert_eq!(Part::of(LM_HEAD), Part::Head);
    }

    #[test]
    fn tied_embedding_lives_in_first_and_last_stage() {
        let p = Partition::from_split(&[2], 4).unwrap();
        assert_eq!(Part::stages_holding(EMBED, &p, true), vec![0, 1]);
        assert_eq!(Part::stages_holding(EMBED, &p, false), vec![0]);
        assert_eq!(
            Part::stages_holding("model.layers.2.mlp.up_proj.weight", &p, true),
            vec![1]
        );
        let one = Partition::from_split(&[], 4).unwrap();
        assert_eq!(Part::stages_holding(EMBED, &one, true), vec![0]);
    }
}

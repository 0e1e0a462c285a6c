//! Does a bank fit a model's config? The bank's sections carry their own
//! shapes; a runtime that took them on trust multiplied tensors of the wrong
//! width (a panic deep in the backend) or read rows the model never wrote.
//! [`check_bank_fits`] compares every section with what `config.json`
//! implies, before a bank is used (native runtime and browser alike).
//!
//! The expected sections are those `memlayer-train`'s exporter writes:
//! `pkm_values` (rows `n_keys²`, `dim` = `v_dim`) when the model has a
//! product-key memory, then one `ffn_blocks` section per level `l = 1..=L`
//! (`nodes` = `b^l` plus the generic block when trained, `layers` = the
//! dense layers, `units` = `hier.units[l-1]`, `dim` = `dim`). Page sizes
//! and element types are the bank's own choice (any is read correctly).

use memlayer_bank::{SectionInfo, SectionKind};
use memlayer_core::model::ModelConfig;

/// A bank section that does not match the config: names the section, the
/// field, the bank's value and the config's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the bank at {location} does not fit this model's config.json: {section} {field} is {bank} \
     in the bank, the config needs {config}"
)]
pub struct BankFitError {
    /// The bank's path or URL.
    pub location: String,
    /// The section (`section 0 (pkm_values)`), or `the bank` for the
    /// section list itself.
    pub section: String,
    /// The field (`dim`, `rows`, `nodes`, `units`, `layers`, `level`, `kind`,
    /// `section count`).
    pub field: &'static str,
    /// The bank's value.
    pub bank: String,
    /// The config's value and where it comes from.
    pub config: String,
}

/// One expected section: its kind with the shape the config implies, and
/// where each number comes from.
fn expected(cfg: &ModelConfig) -> Vec<SectionKind> {
    let mut out = Vec::new();
    if let Some(c) = cfg.pkm_config() {
        out.push(SectionKind::PkmValues {
            rows: c.n_rows() as u64,
            dim: c.v_dim as u32,
            // not compared: the bank's own paging
            page_rows: 0,
        });
    }
    if let Some(h) = &cfg.hier {
        let layers = cfg.dense_layers().len() as u32;
        for l in 1..=h.levels {
            out.push(SectionKind::FfnBlocks {
                level: l as u32,
                nodes: h.rows(l) as u64,
                layers,
                units: h.units.get(l - 1).copied().unwrap_or(0) as u32,
                dim: cfg.dim as u32,
            });
        }
    }
    out
}

fn describe(kind: &SectionKind) -> String {
    match kind {
        SectionKind::PkmValues { .. } => "pkm_values".to_string(),
        SectionKind::FfnBlocks { level, .. } => format!("ffn_blocks level {level}"),
    }
}

/// Checks that `sections` (a bank's, in file order) are exactly the
/// sections `cfg` needs, with the config's shapes. `cfg` must have passed
/// [`ModelConfig::check`] (its sizes fit the bank format's integers).
pub fn check_bank_fits(
    cfg: &ModelConfig,
    sections: &[SectionInfo],
    location: &str,
) -> Result<(), BankFitError> {
    let want = expected(cfg);
    let err = |section: String, field: &'static str, bank: String, config: String| BankFitError {
        location: location.to_string(),
        section,
        field,
        bank,
        config,
    };
    if sections.len() != want.len() {
        let list = |kinds: &mut dyn Iterator<Item = String>| kinds.collect::<Vec<_>>().join(", ");
        return Err(err(
            "the bank".into(),
            "section count",
            format!(
                "{} ({})",
                sections.len(),
                list(&mut sections.iter().map(|s| describe(&s.spec.kind)))
            ),
            format!("{} ({})", want.len(), list(&mut want.iter().map(describe))),
        ));
    }
    for (i, (s, w)) in sections.iter().zip(&want).enumerate() {
        let name = format!("section {i} ({})", describe(&s.spec.kind));
        let field = |field: &'static str, bank: u64, config: u64, from: &str| {
            if bank == config {
                Ok(())
            } else {
                Err(err(
                    name.clone(),
                    field,
                    bank.to_string(),
                    format!("{config} ({from})"),
                ))
            }
        };
        match (s.spec.kind, *w) {
            (
                SectionKind::PkmValues { rows, dim, .. },
                SectionKind::PkmValues {
                    rows: want_rows,
                    dim: want_dim,
                    ..
                },
            ) => {
                field(
                    "dim",
                    dim.into(),
                    want_dim.into(),
                    "pkm.v_dim, 0 meaning dim",
                )?;
                field("rows", rows, want_rows, "pkm.n_keys²")?;
            }
            (
                SectionKind::FfnBlocks {
                    level,
                    nodes,
                    layers,
                    units,
                    dim,
                },
                SectionKind::FfnBlocks {
                    level: w_level,
                    nodes: w_nodes,
                    layers: w_layers,
                    units: w_units,
                    dim: w_dim,
                },
            ) => {
                field(
                    "level",
                    level.into(),
                    w_level.into(),
                    "levels in order from 1",
                )?;
                field("dim", dim.into(), w_dim.into(), "dim")?;
                field("layers", layers.into(), w_layers.into(), "dense FFN layers")?;
                field(
                    "units",
                    units.into(),
                    w_units.into(),
                    &format!("hier.units[{}]", w_level.saturating_sub(1)),
                )?;
                field(
                    "nodes",
                    nodes,
                    w_nodes,
                    "hier.branching^level, plus 1 with hier.generic",
                )?;
            }
            (got, want) => {
                return Err(err(name.clone(), "kind", describe(&got), describe(&want)));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use memlayer_bank::{BankLayout, Dtype, SectionSpec};

    /// The shared tiny config with 8² = 64 value rows of 12 and a 2-level
    /// hierarchical memory (nodes 2 + 1 and 4 + 1, units 4 and 2).
    fn cfg() -> ModelConfig {
        let mut cfg = ModelConfig::tiny_for_tests(true, true);
        cfg.pkm.as_mut().expect("pkm").n_keys = 8;
        cfg
    }

    /// The sections of a bank laid out from `specs`.
    fn sections(specs: Vec<SectionSpec>) -> Vec<SectionInfo> {
        BankLayout::new(specs).plan().unwrap().sections
    }

    fn good() -> Vec<SectionSpec> {
        vec![
            SectionSpec::pkm_values(64, 12, 3, Dtype::F16),
            SectionSpec::ffn_blocks(1, 3, 2, 4, 16, Dtype::F32),
            SectionSpec::ffn_blocks(2, 5, 2, 2, 16, Dtype::Bf16),
        ]
    }

    #[test]
    fn the_exported_shape_fits_whatever_the_paging_and_dtype() {
        check_bank_fits(&cfg(), &sections(good()), "b").unwrap();
    }

    #[test]
    fn every_mismatch_names_section_field_and_both_values() {
        type Edit = fn(&mut Vec<SectionSpec>);
        let cases: [(Edit, &str, &str, &str); 8] = [
            (
                |s| s[0] = SectionSpec::pkm_values(64, 64, 3, Dtype::F32),
                "section 0 (pkm_values) dim is 64",
                "12 (pkm.v_dim",
                "dim",
            ),
            (
                |s| s[0] = SectionSpec::pkm_values(63, 12, 3, Dtype::F32),
                "rows is 63",
                "64 (pkm.n_keys²)",
                "rows",
            ),
            (
                |s| s[1] = SectionSpec::ffn_blocks(1, 3, 2, 4, 8, Dtype::F32),
                "section 1 (ffn_blocks level 1) dim is 8",
                "16 (dim)",
                "dim",
            ),
            (
                |s| s[1] = SectionSpec::ffn_blocks(1, 4, 2, 4, 16, Dtype::F32),
                "nodes is 4",
                "3 (hier.branching",
                "nodes",
            ),
            (
                |s| s[2] = SectionSpec::ffn_blocks(2, 5, 2, 3, 16, Dtype::F32),
                "units is 3",
                "2 (hier.units[1])",
                "units",
            ),
            (
                |s| s[2] = SectionSpec::ffn_blocks(2, 5, 1, 2, 16, Dtype::F32),
                "layers is 1",
                "2 (dense FFN layers)",
                "layers",
            ),
            (
                |s| {
                    s.pop();
                },
                "section count is 2 (pkm_values, ffn_blocks level 1)",
                "3 (pkm_values, ffn_blocks level 1, ffn_blocks level 2)",
                "section count",
            ),
            (
                |s| s.swap(0, 1),
                "section 0 (ffn_blocks level 1) kind is ffn_blocks level 1",
                "pkm_values",
                "kind",
            ),
        ];
        for (edit, bank, config, field) in cases {
            let mut s = good();
            edit(&mut s);
            let e = check_bank_fits(&cfg(), &sections(s), "/x/memory.bank").unwrap_err();
            assert_eq!(e.field, field);
            let msg = e.to_string();
            assert!(
                msg.contains("the bank at /x/memory.bank does not fit")
                    && msg.contains(bank)
                    && msg.contains(config),
                "{msg}"
            );
        }
    }
}

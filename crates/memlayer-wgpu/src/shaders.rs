//! The shader registry: every WGSL kernel of `shaders/` once, with what a
//! launcher needs to run it.
//!
//! This is the only place the shader files are read (`include_str!`). Each
//! [`Shader`] names its file, entry point, pipeline-overridable boolean
//! constants, workgroup size and bindings (group 0, binding `i` =
//! `bindings[i]`); a [`Variant`] fixes the override constants. Both launchers
//! run the same registry entries:
//!
//! - raw wgpu ([`crate::launch::Kernels`]): the file as written, overrides as
//!   pipeline constants ([`Variant::constants`]);
//! - burn-wgpu / cubecl (`memlayer-model`'s `ops::wgsl`): the text of
//!   [`Variant::storage_text`], where every binding is `var<storage,
//!   read_write>` (cubecl binds storage buffers only and suballocates tensors
//!   from shared buffers, so one buffer can back a read-only and a written
//!   binding of the same dispatch; the all-scalar `Params` structs have the
//!   same layout in uniform and storage space) and the overrides are plain
//!   constants of the variant.
//!
//! `tests/registry.rs` checks every entry against its file: bindings and
//! their access, workgroup size, entry point, overrides, and that the
//! storage adaptation applies.

use crate::context::GpuError;

/// How a kernel binds one buffer (group 0, in binding order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Binding {
    /// The `params` uniform (binding 0 of every kernel).
    Params,
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// One WGSL kernel of `shaders/`.
#[derive(Debug, PartialEq, Eq)]
pub struct Shader {
    /// File name without `.wgsl`; labels, kernel ids, messages.
    pub name: &'static str,
    /// The files of `shaders/` (without `.wgsl`) whose concatenation is
    /// `source`: the shader's own file, then any shared part.
    pub files: &'static [&'static str],
    /// The text of `files`, without `struct Params` (see [`Shader::text`]).
    pub source: &'static str,
    /// The fields of the host `Params` struct launched with it, from which
    /// the WGSL `struct Params` is generated.
    pub params: &'static [(&'static str, &'static str)],
    /// The compute entry point.
    pub entry: &'static str,
    /// `override NAME: bool = false;` constants, in the order of a
    /// [`Variant`]'s flag bits.
    pub overrides: &'static [&'static str],
    /// `@workgroup_size` (1-D).
    pub workgroup: u32,
    /// Binding `i` of group 0 is `bindings[i]`.
    pub bindings: &'static [Binding],
}

use crate::{backward as bw, bag_forward as bf, copy, lookup as lk, reverse_index as ri};
use Binding::{Params as P, Read as R, ReadWrite as W};

macro_rules! shader {
    ($id:ident, $file:literal $(+ $part:literal)?, $params:ty, $wg:expr, [$($b:expr),*]
     $(, overrides = [$($o:literal),*])?) => {
        #[doc = concat!("`shaders/", $file, ".wgsl`", $(" + `shaders/", $part, ".wgsl`",)? ".")]
        pub const $id: Shader = Shader {
            name: $file,
            files: &[$file $(, $part)?],
            source: concat!(
                include_str!(concat!("../../../shaders/", $file, ".wgsl"))
                $(, include_str!(concat!("../../../shaders/", $part, ".wgsl")))?
            ),
            params: <$params as WgslParams>::FIELDS,
            entry: "main",
            overrides: &[$($($o),*)?],
            workgroup: $wg,
            bindings: &[$($b),*],
        };
    };
}

shader!(COPY, "copy", copy::Params, 256, [P, R, W]);
shader!(PK_QK_NORM, "pk_qk_norm", lk::QkNormParams, 64, [P, R, W]);
shader!(PK_SCORES, "pk_scores", lk::ScoresParams, 256, [P, R, R, W]);
// the two selection kernels share pk_rank_key.wgsl (the score order)
shader!(
    PK_TOPK,
    "pk_topk" + "pk_rank_key",
    lk::TopkParams,
    256,
    [P, R, W, W]
);
shader!(
    PK_CANDIDATES,
    "pk_candidates" + "pk_rank_key",
    lk::CandidatesParams,
    64,
    [P, R, R, W, W, W]
);
// the two bag kernels share bag_forward_common.wgsl (constants, Params,
// bindings, shard loads, row addressing)
shader!(
    BAG_FORWARD,
    "bag_forward" + "bag_forward_common",
    bf::Params,
    256,
    [P, R, R, R, R, W, R, R, R],
    overrides = ["F16", "PAGED", "BF16"]
);
shader!(
    BAG_FORWARD_VEC4,
    "bag_forward_vec4" + "bag_forward_common",
    bf::Params,
    256,
    [P, R, R, R, R, W, R, R, R],
    overrides = ["F16", "PAGED", "BF16"]
);
shader!(
    REVERSE_INDEX_HIST,
    "reverse_index_hist",
    ri::SortParams,
    256,
    [P, R, W]
);
shader!(
    REVERSE_INDEX_SCAN,
    "reverse_index_scan",
    ri::LenParams,
    256,
    [P, W, W]
);
shader!(
    REVERSE_INDEX_SCAN_ADD,
    "reverse_index_scan_add",
    ri::LenParams,
    256,
    [P, W, R]
);
shader!(
    REVERSE_INDEX_SCATTER,
    "reverse_index_scatter",
    ri::SortParams,
    256,
    [P, R, R, R, W, W]
);
shader!(
    REVERSE_INDEX_HEADS,
    "reverse_index_heads",
    ri::LenParams,
    256,
    [P, R, W]
);
shader!(
    REVERSE_INDEX_COMPACT,
    "reverse_index_compact",
    ri::LenParams,
    256,
    [P, R, R, W, W, W]
);
shader!(
    BAG_BACKWARD_BAG_OF,
    "bag_backward_bag_of",
    bw::BagOfParams,
    256,
    [P, R, W]
);
shader!(
    BAG_BACKWARD_TABLE,
    "bag_backward_table",
    bw::TableParams,
    256,
    [P, R, R, R, R, R, W]
);
shader!(
    BAG_BACKWARD_DENSE,
    "bag_backward_dense",
    bw::DenseParams,
    256,
    [P, R, R, R, W]
);
shader!(
    BAG_BACKWARD_WEIGHTS,
    "bag_backward_weights",
    bw::WeightsParams,
    64,
    [P, R, R, R, R, R, W],
    overrides = ["F16"]
);
shader!(
    PK_BACKWARD_SOFTMAX,
    "pk_backward_softmax",
    bw::SoftmaxParams,
    64,
    [P, R, R, W]
);
shader!(
    PK_BACKWARD_KEY_NORM,
    "pk_backward_key_norm",
    bw::KeyNormParams,
    64,
    [P, R, W]
);
shader!(
    PK_BACKWARD_KEY_IDS,
    "pk_backward_key_ids",
    bw::KeyIdsParams,
    256,
    [P, R, W]
);
shader!(
    PK_BACKWARD_QUERY,
    "pk_backward_query",
    bw::QueryParams,
    64,
    [P, R, R, R, R, W, W]
);
shader!(
    PK_BACKWARD_KEYS,
    "pk_backward_keys",
    bw::KeysParams,
    64,
    [P, R, R, R, R, R, R, W]
);

/// Every shader of the registry.
pub const ALL: &[&Shader] = &[
    &COPY,
    &PK_QK_NORM,
    &PK_SCORES,
    &PK_TOPK,
    &PK_CANDIDATES,
    &BAG_FORWARD,
    &BAG_FORWARD_VEC4,
    &REVERSE_INDEX_HIST,
    &REVERSE_INDEX_SCAN,
    &REVERSE_INDEX_SCAN_ADD,
    &REVERSE_INDEX_SCATTER,
    &REVERSE_INDEX_HEADS,
    &REVERSE_INDEX_COMPACT,
    &BAG_BACKWARD_BAG_OF,
    &BAG_BACKWARD_TABLE,
    &BAG_BACKWARD_DENSE,
    &BAG_BACKWARD_WEIGHTS,
    &PK_BACKWARD_SOFTMAX,
    &PK_BACKWARD_KEY_NORM,
    &PK_BACKWARD_KEY_IDS,
    &PK_BACKWARD_QUERY,
    &PK_BACKWARD_KEYS,
];

impl Shader {
    /// The variant with every override false.
    pub const fn plain(&'static self) -> Variant {
        Variant {
            shader: self,
            flags: 0,
        }
    }

    /// The variant whose override `i` is bit `i` of `flags`.
    pub const fn variant(&'static self, flags: u32) -> Variant {
        Variant {
            shader: self,
            flags,
        }
    }

    /// The WGSL text a launcher compiles: the `struct Params` generated from
    /// [`Shader::params`] ([`params_wgsl`]), then `source`.
    pub fn text(&self) -> String {
        params_wgsl(self.params) + self.source
    }

    /// Every variant (all combinations of the overrides).
    pub fn variants(&'static self) -> impl Iterator<Item = Variant> {
        (0..1u32 << self.overrides.len()).map(|f| self.variant(f))
    }
}

/// A shader with its override constants fixed: what a launcher compiles
/// and dispatches.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    /// The shader.
    pub shader: &'static Shader,
    /// Bit `i`: value of `shader.overrides[i]`.
    pub flags: u32,
}

impl PartialEq for Variant {
    fn eq(&self, other: &Self) -> bool {
        self.shader.name == other.shader.name && self.flags == other.flags
    }
}

impl Eq for Variant {}

impl std::hash::Hash for Variant {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.shader.name.hash(state);
        self.flags.hash(state);
    }
}

impl Variant {
    /// The value of override `i`.
    pub fn flag(&self, i: usize) -> bool {
        self.flags >> i & 1 == 1
    }

    /// The override constants as wgpu pipeline constants.
    pub fn constants(&self) -> Vec<(&'static str, f64)> {
        (self.shader.overrides.iter().enumerate())
            .map(|(i, &name)| (name, self.flag(i) as u8 as f64))
            .collect()
    }

    /// A label naming the shader and its overrides (`bag_forward[F16,PAGED]`).
    pub fn label(&self) -> String {
        let on: Vec<&str> = (self.shader.overrides.iter().enumerate())
            .filter(|&(i, _)| self.flag(i))
            .map(|(_, &n)| n)
            .collect();
        if on.is_empty() {
            self.shader.name.to_string()
        } else {
            format!("{}[{}]", self.shader.name, on.join(","))
        }
    }

    /// The text a storage-only launcher (cubecl) compiles: the `params`
    /// uniform and every read-only storage binding as `var<storage,
    /// read_write>`, each override a `const` of this variant. Errors if the
    /// file lacks a declaration being adapted (a shader edit this adaptation
    /// must follow; `tests/registry.rs` runs it on every variant).
    pub fn storage_text(&self) -> Result<String, GpuError> {
        const UNIFORM: &str = "var<uniform> params: Params;";
        let name = self.shader.name;
        let text = self.shader.text();
        if !text.contains(UNIFORM) {
            return Err(GpuError::Invalid(format!(
                "{name}: expected a `{UNIFORM}` binding"
            )));
        }
        let mut text = text
            .replace(UNIFORM, "var<storage, read_write> params: Params;")
            .replace("var<storage, read>", "var<storage, read_write>");
        for (i, over) in self.shader.overrides.iter().enumerate() {
            let decl = format!("override {over}: bool = false;");
            if !text.contains(&decl) {
                return Err(GpuError::Invalid(format!(
                    "{name}: expected `{decl}` to specialise"
                )));
            }
            text = text.replace(&decl, &format!("const {over}: bool = {};", self.flag(i)));
        }
        Ok(text)
    }
}

/// A kernel's `Params` struct on the host: its fields in declaration order
/// (name, Rust type), so a test can check them against the WGSL `struct
/// Params` of each shader that binds it.
pub trait WgslParams: bytemuck::Pod {
    /// `(name, type)` of every field, padding (`_pad*`) included.
    const FIELDS: &'static [(&'static str, &'static str)];
}

/// Defines a `#[repr(C)]` Pod parameter struct and its [`WgslParams`]
/// field list (the one definition of a kernel's parameters on the host).
#[doc(hidden)]
#[macro_export]
macro_rules! params {
    ($(#[$m:meta])* $vis:vis struct $name:ident {
        $($(#[$fm:meta])* $fvis:vis $f:ident : $t:ty),* $(,)?
    }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $($(#[$fm])* $fvis $f: $t),*
        }

        impl $crate::shaders::WgslParams for $name {
            const FIELDS: &'static [(&'static str, &'static str)] =
                &[$((stringify!($f), stringify!($t))),*];
        }
    };
}

/// The WGSL `struct Params` of a host struct's `fields` (padding words
/// `_pad*` left out: the uniform's size is rounded up to 16 bytes anyway).
pub fn params_wgsl(fields: &[(&str, &str)]) -> String {
    let mut s = String::from("struct Params {\n");
    for (name, ty) in fields.iter().filter(|(n, _)| !n.starts_with("_pad")) {
        s += &format!("    {name}: {ty},\n");
    }
    s + "}\n\n"
}

/// The `(name, type)` fields of the WGSL `struct Params` of `source`.
pub fn wgsl_params(source: &str) -> Option<Vec<(String, String)>> {
    let start = source.find("struct Params {")? + "struct Params {".len();
    let body = &source[start..start + source[start..].find('}')?];
    let fields = body
        .lines()
        .map(|l| l.split("//").next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let (name, ty) = l.trim_end_matches(',').split_once(':')?;
            Some((name.trim().to_string(), ty.trim().to_string()))
        })
        .collect();
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shader's text declares `struct Params` once, generated from the
    /// Rust struct launched with it: the same fields, names and types in
    /// order (less `_pad` words), all WGSL scalars; no file declares its own.
    #[test]
    fn params_structs_agree_with_the_shaders() {
        for shader in ALL {
            assert!(
                !shader.source.contains("struct Params {"),
                "{}: hand-written `struct Params`",
                shader.name
            );
            let text = shader.text();
            assert_eq!(
                text.matches("struct Params {").count(),
                1,
                "{}",
                shader.name
            );
            let wgsl =
                wgsl_params(&text).unwrap_or_else(|| panic!("{}: no `struct Params`", shader.name));
            let rust: Vec<(String, String)> = (shader.params.iter())
                .filter(|(n, _)| !n.starts_with("_pad"))
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect();
            assert!(!rust.is_empty(), "{}", shader.name);
            assert_eq!(wgsl, rust, "{}", shader.name);
            for (n, t) in &wgsl {
                assert!(
                    ["u32", "i32", "f32"].contains(&t.as_str()),
                    "{}: {n}: {t}",
                    shader.name
                );
            }
        }
    }
}

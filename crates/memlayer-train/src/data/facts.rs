//! Long-tail facts: a seeded synthetic world for measuring memorisation by
//! frequency (DESIGN §5).
//!
//! # The world
//! - `entities` people with unique pronounceable names ("Arlo Venn"), each in
//!   one of `topics` topics (entity `i` is in topic `i % topics`).
//! - Four attributes ([`ATTRIBUTES`]), each with a closed value set:
//!   `birth_year` (the 100 years 1900–1999), `city` (60 generated towns),
//!   `employer` (48 generated companies), `field` (40 fields of study).
//! - **Values correlate with topic**: every topic prefers a subset of each
//!   value set (a 20-year era; `ceil(2·|values|/topics)` cities, employers and
//!   fields, at least 3). With probability `topic_affinity` an entity's value
//!   comes from its topic's preferred subset, otherwise from the whole set.
//!
//! # Training text
//! - Entities get a Zipf rank (a seeded permutation); the entity of each of the
//!   `mentions` sentences is drawn with probability ∝ `rank^-zipf_exponent`.
//! - A sentence states one attribute with one of four **training templates**
//!   of that attribute, or (with probability `two_attribute_fraction`) two
//!   attributes joined by "and". The entity's name always comes before the
//!   value, so the text teaches name → value.
//! - Sentences are grouped by topic into contexts of `sentences_per_context`
//!   sentences (the last context of a topic may be shorter); contexts are
//!   then shuffled. A context is what the retriever embeds and clusters.
//!
//! # Evaluation
//! Every fact (entity, attribute) stated by at least one training sentence
//! becomes a [`FactQuery`] whose prompt uses a fifth, **held-out** template of
//! the attribute that never occurs in training text, with the value at the
//! end: `"The city where Arlo Venn was born is"` → continuation `" Oslin"`
//! ([`FactQuery::continuation`]). Queries are bucketed by how many training
//! sentences stated that exact fact ([`BucketSpec`], rare → common). For
//! ranked multiple choice, [`FactsDataset::candidates`] lists every value of
//! the attribute (chance = 1 / number of values).
//!
//! Every random draw goes through [`Rng`]; each stage (value sets, names,
//! topic preferences, entity values, Zipf ranks, sentences, context order)
//! has its own stream derived from `seed`, so e.g. changing `mentions` keeps
//! the same entities and values.

use std::collections::HashSet;
use std::path::Path;

use memlayer_core::rng::Rng;
use serde::{Deserialize, Serialize};

use super::{Context, DataError, Result, read_utf8, write_atomic};

/// Attribute names, in the order of [`Entity::values`] and
/// [`Entity::mentions`].
pub const ATTRIBUTES: [&str; 4] = ["birth_year", "city", "employer", "field"];

/// Templates of one attribute. `{name}` is the entity's name, `{value}` the
/// attribute's value.
struct AttributeSpec {
    /// Training sentences.
    train: [&'static str; 4],
    /// The verb phrase used after the name in two-attribute sentences
    /// (`"{name} {clause_a} and {clause_b}."`); the wording of one of the
    /// training templates.
    clause: &'static str,
    /// Held-out evaluation prompt; the value follows it after a space.
    heldout: &'static str,
}

const SPECS: [AttributeSpec; 4] = [
    AttributeSpec {
        train: [
            "{name} was born in the year {value}.",
            "The birth year of {name} is {value}.",
            "{name} came into the world in {value}.",
            "{name} has a year of birth of {value}.",
        ],
        clause: "has a year of birth of {value}",
        heldout: "The year in which {name} was born is",
    },
    AttributeSpec {
        train: [
            "{name} was born in {value}.",
            "The birthplace of {name} is {value}.",
            "{name} is a native of {value}.",
            "{name} was born in the city of {value}.",
        ],
        clause: "was born in {value}",
        heldout: "The city where {name} was born is",
    },
    AttributeSpec {
        train: [
            "{name} works for {value}.",
            "The employer of {name} is {value}.",
            "{name} is employed by {value}.",
            "{name} has a job at {value}.",
        ],
        clause: "works for {value}",
        heldout: "The company that employs {name} is",
    },
    AttributeSpec {
        train: [
            "{name} studies {value}.",
            "The field of {name} is {value}.",
            "{name} is a researcher in {value}.",
            "{name} works in the field of {value}.",
        ],
        clause: "studies {value}",
        heldout: "The field that {name} works in is",
    },
];

const FIELDS: [&str; 40] = [
    "astronomy",
    "botany",
    "chemistry",
    "geology",
    "linguistics",
    "medicine",
    "music",
    "painting",
    "poetry",
    "architecture",
    "economics",
    "history",
    "law",
    "mathematics",
    "philosophy",
    "physics",
    "sculpture",
    "zoology",
    "ecology",
    "genetics",
    "robotics",
    "cartography",
    "oceanography",
    "meteorology",
    "archaeology",
    "anthropology",
    "psychology",
    "sociology",
    "statistics",
    "theology",
    "agriculture",
    "metallurgy",
    "optics",
    "acoustics",
    "navigation",
    "pharmacy",
    "dentistry",
    "forestry",
    "glassblowing",
    "weaving",
];
const FIRST_YEAR: u32 = 1900;
const YEARS: usize = 100;
const ERA_YEARS: usize = 20;
const CITIES: usize = 60;
const EMPLOYERS: usize = 48;

const ONSETS: [&str; 23] = [
    "b", "br", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "r", "s", "st",
    "t", "th", "tr", "v", "z",
];
const VOWELS: [&str; 8] = ["a", "e", "i", "o", "u", "ai", "ei", "ou"];
/// Word-final consonants; the empty coda is listed three times (more open
/// syllables).
const CODAS: [&str; 10] = ["", "", "", "n", "r", "l", "s", "m", "th", "nd"];
const CITY_SUFFIXES: [&str; 10] = [
    "ton", "ford", "holm", "vik", "mere", "dale", "burg", "wick", "stead", "port",
];
const COMPANY_SUFFIXES: [&str; 10] = [
    "Labs",
    "Works",
    "Group",
    "Systems",
    "Foundry",
    "Institute",
    "Partners",
    "Mills",
    "Press",
    "Guild",
];

/// Configuration of [`FactsDataset::generate`]. Missing JSON fields take the
/// [`FactsConfig::tiny`] values; unknown fields are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FactsConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Number of entities (people).
    pub entities: usize,
    /// Number of topics (1 ..= entities).
    pub topics: usize,
    /// Zipf exponent `s`: the entity of Zipf rank `r` is mentioned with
    /// probability ∝ `r^-s`.
    pub zipf_exponent: f64,
    /// Total number of training sentences.
    pub mentions: usize,
    /// Sentences per context (document).
    pub sentences_per_context: usize,
    /// Probability that a sentence states two attributes instead of one.
    pub two_attribute_fraction: f64,
    /// Probability that an entity's value comes from its topic's preferred
    /// subset of the value set.
    pub topic_affinity: f64,
    /// Lower mention-count edges of the evaluation buckets, strictly
    /// ascending, the first >= 1: `[1, 3, 8, 32]` gives 1–2, 3–7, 8–31, 32+.
    pub bucket_edges: Vec<u32>,
}

impl Default for FactsConfig {
    fn default() -> Self {
        Self::tiny()
    }
}

impl FactsConfig {
    /// For a ~2-minute CPU run of a ~1M-parameter model: 1 000 entities in 8
    /// topics, 10 000 sentences (1 250 contexts of 8 sentences). With
    /// `s = 1` the top entity gets ~1 300 sentences and the bottom half 1–3
    /// each, so every bucket holds dozens of queries.
    pub fn tiny() -> Self {
        Self {
            seed: 0,
            entities: 1_000,
            topics: 8,
            zipf_exponent: 1.0,
            mentions: 10_000,
            sentences_per_context: 8,
            two_attribute_fraction: 0.25,
            topic_affinity: 0.8,
            bucket_edges: vec![1, 3, 8, 32],
        }
    }

    /// The demo world: 2 000 entities in 32 topics, 50 000 sentences
    /// (6 250 contexts); the rarest entities still get 1–3 sentences.
    pub fn demo() -> Self {
        Self {
            entities: 2_000,
            topics: 32,
            mentions: 50_000,
            ..Self::tiny()
        }
    }

    /// Checks every field's domain.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DataError::Config(format!("facts: {m}")));
        if self.entities == 0 || self.entities > 10_000_000 {
            return bad(format!(
                "entities must be in 1..=10000000, got {}",
                self.entities
            ));
        }
        if self.topics == 0 || self.topics > self.entities {
            return bad(format!(
                "topics must be in 1..=entities ({}), got {}",
                self.entities, self.topics
            ));
        }
        if !(self.zipf_exponent.is_finite() && (0.0..=10.0).contains(&self.zipf_exponent)) {
            return bad(format!(
                "zipf_exponent must be in [0, 10], got {}",
                self.zipf_exponent
            ));
        }
        if self.mentions == 0 || self.mentions > 1_000_000_000 {
            return bad(format!(
                "mentions must be in 1..=1000000000, got {}",
                self.mentions
            ));
        }
        if self.sentences_per_context == 0 {
            return bad("sentences_per_context must be >= 1".into());
        }
        for (name, p) in [
            ("two_attribute_fraction", self.two_attribute_fraction),
            ("topic_affinity", self.topic_affinity),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1], got {p}"));
            }
        }
        let e = &self.bucket_edges;
        if e.is_empty() || e[0] == 0 || e.windows(2).any(|w| w[0] >= w[1]) {
            return bad(format!(
                "bucket_edges must be non-empty, strictly ascending and start at >= 1, got {e:?}"
            ));
        }
        Ok(())
    }

    /// The buckets given by [`Self::bucket_edges`].
    pub fn buckets(&self) -> Vec<BucketSpec> {
        let e = &self.bucket_edges;
        (0..e.len())
            .map(|i| {
                let min = e[i];
                let max = e.get(i + 1).map_or(u32::MAX, |&next| next - 1);
                let name = if max == u32::MAX {
                    format!("{min}+")
                } else if min == max {
                    format!("{min}")
                } else {
                    format!("{min}-{max}")
                };
                BucketSpec {
                    name,
                    min_mentions: min,
                    max_mentions: max,
                }
            })
            .collect()
    }
}

/// A range of mention counts, inclusive on both ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSpec {
    /// e.g. `"3-7"` or `"32+"`.
    pub name: String,
    /// Smallest mention count in the bucket (>= 1).
    pub min_mentions: u32,
    /// `u32::MAX` for the open last bucket.
    pub max_mentions: u32,
}

impl BucketSpec {
    /// Whether `mentions` falls in this bucket.
    pub fn contains(&self, mentions: u32) -> bool {
        (self.min_mentions..=self.max_mentions).contains(&mentions)
    }
}

/// One synthetic person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    /// Index of the entity in [`FactsDataset::entities`].
    pub id: u32,
    /// Unique "First Last".
    pub name: String,
    /// Topic of the entity (`id % topics`).
    pub topic: u32,
    /// Zipf rank, 1 = most mentioned in expectation.
    pub rank: u32,
    /// Value of each attribute, in [`ATTRIBUTES`] order.
    pub values: Vec<String>,
    /// Training sentences stating each attribute, in [`ATTRIBUTES`] order.
    pub mentions: Vec<u32>,
}

impl Entity {
    /// The value of `attribute` (one of [`ATTRIBUTES`]).
    pub fn value(&self, attribute: &str) -> Option<&str> {
        let a = attribute_index(attribute)?;
        self.values.get(a).map(String::as_str)
    }
}

/// One evaluation question: continue `prompt` with `" " + answer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactQuery {
    /// [`Entity::id`] of the entity asked about.
    pub entity: u32,
    /// Topic of the entity.
    pub topic: u32,
    /// One of [`ATTRIBUTES`].
    pub attribute: String,
    /// Held-out template with the entity's name, ending right before the
    /// value (no trailing space).
    pub prompt: String,
    /// The value, without the leading space.
    pub answer: String,
    /// Training sentences that stated this exact fact (>= 1).
    pub mentions: u32,
    /// Index into [`FactsDataset::buckets`].
    pub bucket: usize,
}

impl FactQuery {
    /// What the model should generate after `prompt`: `" " + answer`.
    pub fn continuation(&self) -> String {
        format!(" {}", self.answer)
    }
}

/// The generated world, its training contexts and evaluation queries.
#[derive(Debug, Clone, PartialEq)]
pub struct FactsDataset {
    /// The configuration the world was generated from.
    pub config: FactsConfig,
    /// Every entity, indexed by [`Entity::id`].
    pub entities: Vec<Entity>,
    /// Training contexts (shuffled); every one has `topic: Some(_)`.
    pub contexts: Vec<Context>,
    /// One query per fact with >= 1 training mention, in (entity, attribute)
    /// order.
    pub eval: Vec<FactQuery>,
    /// Mention-count buckets, rare → common.
    pub buckets: Vec<BucketSpec>,
    /// Value set of each attribute, in [`ATTRIBUTES`] order.
    values: Vec<Vec<String>>,
}

/// Index of `attribute` in [`ATTRIBUTES`].
pub fn attribute_index(attribute: &str) -> Option<usize> {
    ATTRIBUTES.iter().position(|&a| a == attribute)
}

/// Independent stream `stream` of the generator seeded by `seed`.
fn stream(seed: u64, stream: u64) -> Rng {
    Rng::new(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F))
}

fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

fn capitalize(word: &str) -> String {
    let mut c = word.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// A pronounceable lowercase word of `syllables` onset+vowel syllables and an
/// optional final consonant.
fn word(rng: &mut Rng, syllables: usize) -> String {
    let mut w = String::new();
    for _ in 0..syllables {
        w.push_str(pick(rng, &ONSETS));
        w.push_str(pick(rng, &VOWELS));
    }
    w.push_str(pick(rng, &CODAS));
    w
}

/// `count` distinct strings from `make`; errors if the generator keeps
/// repeating itself.
fn distinct(
    rng: &mut Rng,
    count: usize,
    what: &str,
    reserved: &mut HashSet<String>,
    mut make: impl FnMut(&mut Rng) -> String,
) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(count);
    let mut tries = 0usize;
    while out.len() < count {
        tries += 1;
        if tries > 1000 + 100 * count {
            return Err(DataError::Config(format!(
                "facts: cannot generate {count} distinct {what}"
            )));
        }
        let s = make(rng);
        if reserved.insert(s.clone()) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Draws one index from the cumulative weights `cum` (ascending, last =
/// total).
fn sample_cumulative(rng: &mut Rng, cum: &[f64]) -> usize {
    let total = cum[cum.len() - 1];
    let u = rng.next_f64() * total;
    cum.partition_point(|&c| c <= u).min(cum.len() - 1)
}

fn render(template: &str, name: &str, value: &str) -> String {
    template.replace("{name}", name).replace("{value}", value)
}

impl FactsDataset {
    /// Generates the world described in the module docs. Deterministic in
    /// `config`.
    pub fn generate(config: &FactsConfig) -> Result<Self> {
        config.validate()?;
        let seed = config.seed;
        let (n, topics) = (config.entities, config.topics);

        // Value sets. Words used by values are reserved so no person's name
        // reuses them.
        let mut rng = stream(seed, 1);
        let mut reserved: HashSet<String> = HashSet::new();
        let years: Vec<String> = (0..YEARS as u32)
            .map(|y| (FIRST_YEAR + y).to_string())
            .collect();
        let cities = distinct(&mut rng, CITIES, "cities", &mut reserved, |r| {
            let syl = 1 + r.below(2) as usize;
            let mut w = String::new();
            for _ in 0..syl {
                w.push_str(pick(r, &ONSETS));
                w.push_str(pick(r, &VOWELS));
            }
            capitalize(&(w + pick(r, &CITY_SUFFIXES)))
        })?;
        let company_words = distinct(&mut rng, EMPLOYERS, "employers", &mut reserved, |r| {
            capitalize(&word(r, 2))
        })?;
        let employers: Vec<String> = company_words
            .iter()
            .map(|w| format!("{w} {}", pick(&mut rng, &COMPANY_SUFFIXES)))
            .collect();
        let fields: Vec<String> = FIELDS.iter().map(|s| s.to_string()).collect();
        let values = vec![years, cities, employers, fields];

        // Unique entity names: "First Last", neither word a value word.
        let mut rng = stream(seed, 2);
        let mut names_seen: HashSet<String> = HashSet::new();
        let names = distinct(&mut rng, n, "entity names", &mut names_seen, |r| {
            loop {
                let first = capitalize(&word(r, 2));
                let last = capitalize(&word(r, 2));
                if !reserved.contains(&first) && !reserved.contains(&last) {
                    return format!("{first} {last}");
                }
            }
        })?;

        // Topic preferences: per topic and attribute, the preferred value ids.
        let mut rng = stream(seed, 3);
        let preferred: Vec<Vec<Vec<usize>>> = (0..topics)
            .map(|_| {
                values
                    .iter()
                    .enumerate()
                    .map(|(a, vals)| {
                        let m = vals.len();
                        if a == 0 {
                            let start = rng.below((m - ERA_YEARS + 1) as u64) as usize;
                            (start..start + ERA_YEARS).collect()
                        } else {
                            let k = (2 * m).div_ceil(topics).clamp(3, m);
                            let mut ids: Vec<usize> = (0..m).collect();
                            rng.shuffle(&mut ids);
                            ids.truncate(k);
                            ids.sort_unstable();
                            ids
                        }
                    })
                    .collect()
            })
            .collect();

        // Entities and their values.
        let mut rng = stream(seed, 4);
        let mut entities: Vec<Entity> = names
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let topic = i % topics;
                let vals = values
                    .iter()
                    .enumerate()
                    .map(|(a, vals)| {
                        let pref = &preferred[topic][a];
                        let id = if rng.next_f64() < config.topic_affinity {
                            pref[rng.below(pref.len() as u64) as usize]
                        } else {
                            rng.below(vals.len() as u64) as usize
                        };
                        vals[id].clone()
                    })
                    .collect();
                Entity {
                    id: i as u32,
                    name,
                    topic: topic as u32,
                    rank: 0,
                    values: vals,
                    mentions: vec![0; ATTRIBUTES.len()],
                }
            })
            .collect();

        // Zipf ranks: a random permutation; cumulative weights by entity id.
        let mut rng = stream(seed, 5);
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        for (r, &e) in order.iter().enumerate() {
            entities[e].rank = r as u32 + 1;
        }
        let mut cum = Vec::with_capacity(n);
        let mut acc = 0.0f64;
        for e in &entities {
            acc += (e.rank as f64).powf(-config.zipf_exponent);
            cum.push(acc);
        }

        // Sentences, bucketed by topic.
        let mut rng = stream(seed, 6);
        let mut by_topic: Vec<Vec<(String, u32)>> = vec![Vec::new(); topics];
        let na = ATTRIBUTES.len() as u64;
        for _ in 0..config.mentions {
            let e = sample_cumulative(&mut rng, &cum);
            let ent = &mut entities[e];
            let text = if rng.next_f64() < config.two_attribute_fraction {
                let a = rng.below(na) as usize;
                let mut b = rng.below(na - 1) as usize;
                if b >= a {
                    b += 1;
                }
                ent.mentions[a] += 1;
                ent.mentions[b] += 1;
                format!(
                    "{} {} and {}.",
                    ent.name,
                    render(SPECS[a].clause, &ent.name, &ent.values[a]),
                    render(SPECS[b].clause, &ent.name, &ent.values[b])
                )
            } else {
                let a = rng.below(na) as usize;
                ent.mentions[a] += 1;
                let t = pick(&mut rng, &SPECS[a].train);
                render(t, &ent.name, &ent.values[a])
            };
            by_topic[ent.topic as usize].push((text, ent.id));
        }

        // Contexts: consecutive sentences of one topic, then shuffled.
        let mut contexts = Vec::new();
        for (t, sentences) in by_topic.iter().enumerate() {
            for chunk in sentences.chunks(config.sentences_per_context) {
                let mut ids: Vec<u32> = Vec::new();
                for &(_, e) in chunk {
                    if !ids.contains(&e) {
                        ids.push(e);
                    }
                }
                let text = chunk
                    .iter()
                    .map(|(s, _)| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" ");
                contexts.push(Context {
                    text,
                    topic: Some(t as u32),
                    entity_ids: ids,
                });
            }
        }
        stream(seed, 7).shuffle(&mut contexts);

        // Evaluation queries.
        let buckets = config.buckets();
        let mut eval = Vec::new();
        for ent in &entities {
            for (a, spec) in SPECS.iter().enumerate() {
                let m = ent.mentions[a];
                if m == 0 {
                    continue;
                }
                // Every count >= edges[0] >= 1 lies in exactly one bucket.
                let bucket = buckets.iter().rposition(|b| m >= b.min_mentions);
                let Some(bucket) = bucket else { continue };
                eval.push(FactQuery {
                    entity: ent.id,
                    topic: ent.topic,
                    attribute: ATTRIBUTES[a].to_string(),
                    prompt: render(spec.heldout, &ent.name, ""),
                    answer: ent.values[a].clone(),
                    mentions: m,
                    bucket,
                });
            }
        }

        Ok(Self {
            config: config.clone(),
            entities,
            contexts,
            eval,
            buckets,
            values,
        })
    }

    /// Every value of `attribute`, `None` for an unknown attribute.
    pub fn attribute_values(&self, attribute: &str) -> Option<&[String]> {
        attribute_index(attribute).map(|a| self.values[a].as_slice())
    }

    /// The multiple-choice candidates of a query: every value of its
    /// attribute (one of them is `q.answer`).
    pub fn candidates(&self, q: &FactQuery) -> &[String] {
        self.attribute_values(&q.attribute).unwrap_or(&[])
    }

    /// Number of queries in each bucket.
    pub fn bucket_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.buckets.len()];
        for q in &self.eval {
            c[q.bucket] += 1;
        }
        c
    }

    /// All contexts, separated by blank lines, ending with a newline (the
    /// tokenizer's training text; [`super::corpus::contexts_from_text`] with a
    /// small target splits it back into paragraphs).
    pub fn training_text(&self) -> String {
        let mut s = String::new();
        for c in &self.contexts {
            s.push_str(&c.text);
            s.push_str("\n\n");
        }
        s.pop();
        s
    }

    /// Context texts, in order.
    pub fn texts(&self) -> Vec<&str> {
        self.contexts.iter().map(|c| c.text.as_str()).collect()
    }

    /// Writes [`Self::training_text`] to `path` (atomically).
    pub fn write_corpus(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.training_text().as_bytes())
    }

    /// Writes the evaluation queries as JSON lines (atomically).
    pub fn write_eval_jsonl(&self, path: &Path) -> Result<()> {
        let mut s = String::new();
        for q in &self.eval {
            let line = serde_json::to_string(q)
                .map_err(|e| DataError::parse(path, format!("serialising a query: {e}")))?;
            s.push_str(&line);
            s.push('\n');
        }
        write_atomic(path, s.as_bytes())
    }

    /// Writes `corpus.txt`, `eval.jsonl` and `meta.json` (config, buckets,
    /// attribute values, entities) into `dir`, creating it if needed.
    pub fn write_to_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io("create directory", dir, e))?;
        self.write_corpus(&dir.join("corpus.txt"))?;
        self.write_eval_jsonl(&dir.join("eval.jsonl"))?;
        let meta = serde_json::json!({
            "config": self.config,
            "buckets": self.buckets,
            "attributes": ATTRIBUTES,
            "attribute_values": self.values,
            "entities": self.entities,
        });
        let path = dir.join("meta.json");
        let text = serde_json::to_string_pretty(&meta)
            .map_err(|e| DataError::parse(&path, e.to_string()))?;
        write_atomic(&path, text.as_bytes())
    }
}

/// Reads queries written by [`FactsDataset::write_eval_jsonl`]; errors name
/// the path and line. Blank lines are skipped.
pub fn read_eval_jsonl(path: &Path) -> Result<Vec<FactQuery>> {
    let text = read_utf8(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: FactQuery = serde_json::from_str(line)
            .map_err(|e| DataError::parse(path, format!("line {}: {e}", i + 1)))?;
        out.push(q);
    }
    Ok(out)
}

/// Reads a [`FactsConfig`] from a JSON file (missing fields take the tiny
/// preset's values) and validates it.
pub fn read_config(path: &Path) -> Result<FactsConfig> {
    let text = read_utf8(path)?;
    let cfg: FactsConfig =
        serde_json::from_str(&text).map_err(|e| DataError::parse(path, e.to_string()))?;
    cfg.validate()
        .map_err(|e| DataError::parse(path, e.to_string()))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> FactsDataset {
        FactsDataset::generate(&FactsConfig::tiny()).unwrap()
    }

    #[test]
    fn deterministic_per_seed() {
        let a = tiny();
        let b = tiny();
        assert_eq!(a, b);
        let c = FactsDataset::generate(&FactsConfig {
            seed: 1,
            ..FactsConfig::tiny()
        })
        .unwrap();
        assert_ne!(a.entities, c.entities);
        assert_ne!(a.training_text(), c.training_text());
        // changing the number of sentences keeps the world
        let d = FactsDataset::generate(&FactsConfig {
            mentions: 3_000,
            ..FactsConfig::tiny()
        })
        .unwrap();
        for (x, y) in a.entities.iter().zip(&d.entities) {
            assert_eq!((&x.name, &x.values, x.rank), (&y.name, &y.values, y.rank));
        }
    }

    #[test]
    fn names_are_unique_and_values_closed() {
        let ds = FactsDataset::generate(&FactsConfig::demo()).unwrap();
        let names: HashSet<&str> = ds.entities.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names.len(), ds.entities.len());
        for (a, attr) in ATTRIBUTES.iter().enumerate() {
            let vals = ds.attribute_values(attr).unwrap();
            assert!((30..=100).contains(&vals.len()), "{attr}: {}", vals.len());
            let set: HashSet<&String> = vals.iter().collect();
            assert_eq!(set.len(), vals.len(), "{attr} values repeat");
            for e in &ds.entities {
                assert!(vals.contains(&e.values[a]));
                assert_eq!(e.value(attr), Some(e.values[a].as_str()));
            }
        }
        assert!(ds.attribute_values("shoe_size").is_none());
        // no name word is a value word
        let value_words: HashSet<&str> = ds
            .values
            .iter()
            .flatten()
            .flat_map(|v| v.split(' '))
            .collect();
        for e in &ds.entities {
            for w in e.name.split(' ') {
                assert!(!value_words.contains(w), "{w}");
            }
        }
        let topics: HashSet<u32> = ds.entities.iter().map(|e| e.topic).collect();
        assert_eq!(topics.len(), 32);
    }

    #[test]
    fn values_correlate_with_topic() {
        let ds = tiny();
        // share of entities whose city is among their topic's 3 most common
        // cities: far above the 3/60 of independent values
        let a = attribute_index("city").unwrap();
        let mut hits = 0;
        for t in 0..ds.config.topics as u32 {
            let members: Vec<&Entity> = ds.entities.iter().filter(|e| e.topic == t).collect();
            let mut counts: Vec<(usize, &str)> = Vec::new();
            for v in ds.attribute_values("city").unwrap() {
                let c = members.iter().filter(|e| &e.values[a] == v).count();
                counts.push((c, v));
            }
            counts.sort_by_key(|c| std::cmp::Reverse(c.0));
            hits += counts[..3].iter().map(|c| c.0).sum::<usize>();
        }
        let share = hits as f64 / ds.entities.len() as f64;
        assert!(share > 0.25, "{share}");
    }

    #[test]
    fn zipf_shape() {
        let ds = tiny();
        let totals: Vec<u32> = ds
            .entities
            .iter()
            .map(|e| e.mentions.iter().sum())
            .collect();
        let max = *totals.iter().max().unwrap();
        let few = totals.iter().filter(|&&t| (1..=2).contains(&t)).count();
        // rank 1 expects ~10000·1.25/H_1000 ≈ 1670 attribute mentions
        assert!(max > 1000, "max {max}");
        assert!(few >= 100, "{few} entities with 1-2 mentions");
        // mentions decrease with rank on average
        let by_rank = |lo: u32, hi: u32| -> f64 {
            let v: Vec<u32> = ds
                .entities
                .iter()
                .filter(|e| (lo..hi).contains(&e.rank))
                .map(|e| e.mentions.iter().sum())
                .collect();
            v.iter().sum::<u32>() as f64 / v.len() as f64
        };
        assert!(by_rank(1, 11) > 5.0 * by_rank(11, 101));
        assert!(by_rank(11, 101) > 3.0 * by_rank(101, 1001));
        // sentence count
        let sentences: usize = ds
            .contexts
            .iter()
            .map(|c| c.text.matches(". ").count() + 1)
            .sum();
        assert_eq!(sentences, ds.config.mentions);
    }

    #[test]
    fn heldout_templates_never_in_training_text() {
        let ds = tiny();
        let text = ds.training_text();
        for spec in &SPECS {
            // the frame around the name never occurs (parts of 2+ words)
            for part in spec.heldout.split("{name}") {
                let part = part.trim();
                if part.contains(' ') {
                    assert!(!text.contains(part), "{part:?} leaks into training");
                }
            }
            assert!(spec.heldout.starts_with("The ") && !spec.heldout.contains("{value}"));
            for t in spec.train {
                assert!(t.find("{name}") < t.find("{value}"), "{t}");
                assert!(t.ends_with("{value}."));
            }
            assert!(spec.train.iter().any(|t| t.contains(spec.clause)));
        }
        for q in &ds.eval {
            assert!(!text.contains(&q.prompt));
            assert!(q.prompt.ends_with(" is"));
        }
    }

    #[test]
    fn eval_matches_training_mentions_and_buckets() {
        let ds = tiny();
        let text = ds.training_text();
        assert_eq!(ds.buckets.len(), 4);
        assert_eq!(ds.buckets[0].name, "1-2");
        assert_eq!(ds.buckets[3].name, "32+");
        let counts = ds.bucket_counts();
        for (b, &c) in ds.buckets.iter().zip(&counts) {
            assert!(c >= 40, "bucket {} has {c} queries: {counts:?}", b.name);
        }
        for q in &ds.eval {
            let e = &ds.entities[q.entity as usize];
            let a = attribute_index(&q.attribute).unwrap();
            assert_eq!(q.answer, e.values[a]);
            assert_eq!(q.mentions, e.mentions[a]);
            assert!(ds.buckets[q.bucket].contains(q.mentions));
            assert!(q.prompt.contains(&e.name));
            assert!(ds.candidates(q).contains(&q.answer));
            assert_eq!(q.continuation(), format!(" {}", q.answer));
        }
        // a rare fact is really stated in the training text
        let q = ds.eval.iter().find(|q| q.mentions == 1).unwrap();
        let e = &ds.entities[q.entity as usize];
        let stated = text
            .split(". ")
            .filter(|s| s.starts_with(&e.name) || s.contains(&format!(" of {}", e.name)))
            .any(|s| s.contains(&q.answer));
        assert!(stated, "{q:?}");
        // queries exist exactly for mentioned facts
        let facts: usize = ds
            .entities
            .iter()
            .map(|e| e.mentions.iter().filter(|&&m| m > 0).count())
            .sum();
        assert_eq!(facts, ds.eval.len());
    }

    #[test]
    fn contexts_are_single_topic() {
        let ds = tiny();
        let n = ds.config.mentions.div_ceil(ds.config.sentences_per_context);
        assert!(ds.contexts.len() >= n && ds.contexts.len() <= n + ds.config.topics);
        for c in &ds.contexts {
            let t = c.topic.unwrap();
            assert!(!c.entity_ids.is_empty());
            for &e in &c.entity_ids {
                let ent = &ds.entities[e as usize];
                assert_eq!(ent.topic, t);
                assert!(c.text.contains(&ent.name));
            }
            assert!(!c.text.contains('\n'));
        }
    }

    #[test]
    fn config_json_and_validation() {
        let cfg = FactsConfig::demo();
        let json = serde_json::to_string(&cfg).unwrap();
        let back: FactsConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        let partial: FactsConfig = serde_json::from_str(r#"{"seed": 5, "entities": 50}"#).unwrap();
        assert_eq!(partial.seed, 5);
        assert_eq!(partial.topics, FactsConfig::tiny().topics);
        assert!(serde_json::from_str::<FactsConfig>(r#"{"entites": 5}"#).is_err());
        let bad = [
            FactsConfig {
                entities: 0,
                ..FactsConfig::tiny()
            },
            FactsConfig {
                topics: 1001,
                ..FactsConfig::tiny()
            },
            FactsConfig {
                zipf_exponent: f64::NAN,
                ..FactsConfig::tiny()
            },
            FactsConfig {
                bucket_edges: vec![0, 3],
                ..FactsConfig::tiny()
            },
            FactsConfig {
                bucket_edges: vec![3, 3],
                ..FactsConfig::tiny()
            },
            FactsConfig {
                topic_affinity: 1.5,
                ..FactsConfig::tiny()
            },
        ];
        for c in bad {
            let err = FactsDataset::generate(&c).unwrap_err();
            assert!(matches!(err, DataError::Config(_)), "{err}");
        }
        // degenerate but valid: one entity, one topic
        let one = FactsDataset::generate(&FactsConfig {
            entities: 1,
            topics: 1,
            mentions: 3,
            ..FactsConfig::tiny()
        })
        .unwrap();
        assert_eq!(one.contexts.len(), 1);
        assert!(!one.eval.is_empty());
    }

    #[test]
    fn files_round_trip() {
        let dir = crate::data::test_dir("facts");
        let ds = FactsDataset::generate(&FactsConfig {
            entities: 40,
            topics: 4,
            mentions: 300,
            ..FactsConfig::tiny()
        })
        .unwrap();
        ds.write_to_dir(&dir).unwrap();
        assert_eq!(
            read_utf8(&dir.join("corpus.txt")).unwrap(),
            ds.training_text()
        );
        assert_eq!(read_eval_jsonl(&dir.join("eval.jsonl")).unwrap(), ds.eval);
        let meta: serde_json::Value =
            serde_json::from_str(&read_utf8(&dir.join("meta.json")).unwrap()).unwrap();
        assert_eq!(meta["attribute_values"][1].as_array().unwrap().len(), 60);
        let cfg_path = dir.join("cfg.json");
        std::fs::write(&cfg_path, r#"{"entities": 40, "topics": 4}"#).unwrap();
        assert_eq!(read_config(&cfg_path).unwrap().entities, 40);
        std::fs::write(&cfg_path, r#"{"entities": 4, "topics": 40}"#).unwrap();
        let err = read_config(&cfg_path).unwrap_err().to_string();
        assert!(err.contains("cfg.json") && err.contains("topics"), "{err}");
        std::fs::write(dir.join("bad.jsonl"), "{\"entity\": 1}\n").unwrap();
        let err = read_eval_jsonl(&dir.join("bad.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.jsonl") && err.contains("line 1"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

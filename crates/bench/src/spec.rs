//! The length-spec grammar of `--input-len` and `--output-len`: a distribution of token counts.
//!
//! ```text
//! spec     := dist | "mix:" weighted ("," weighted)*
//! weighted := WEIGHT "*" dist                  weights > 0, summing to 1
//! dist     := N                                 same as fixed:N
//!           | "fixed:" N                        always N
//!           | "uniform:" LO ":" HI              every integer in LO..=HI equally likely
//!           | "lognormal:" MEDIAN ":" SIGMA [":" MIN ":" MAX]
//!                                               round(MEDIAN * exp(SIGMA * Z)), Z standard normal,
//!                                               clamped to MIN..=MAX (default 1..=LENGTH_MAX)
//! ```
//!
//! Every length is between 1 and [`LENGTH_MAX`]. Examples: `512`, `uniform:8192:32768`, `lognormal:512:1.0`,
//! `mix:0.9*lognormal:512:1.0,0.1*uniform:8192:32768` (90% chat-like prompts, 10% long documents).

use std::fmt;

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// The longest length a spec may produce, in tokens (16 Mi): far past any context, small enough that a typo such as
/// `uniform:1:1e12` is caught.
pub const LENGTH_MAX: u32 = 1 << 24;

/// A distribution of lengths in tokens, parsed from the grammar above.
#[derive(Clone, Debug, PartialEq)]
pub enum LengthSpec {
    Dist(Dist),
    /// Components with weights summing to 1; each draw picks a component, then a length from it.
    Mix(Vec<(f64, Dist)>),
}

/// One component of a [`LengthSpec`].
#[derive(Clone, Debug, PartialEq)]
pub enum Dist {
    Fixed(u32),
    Uniform {
        lo: u32,
        hi: u32,
    },
    LogNormal {
        median: f64,
        sigma: f64,
        min: u32,
        max: u32,
    },
}

/// A spec that does not parse, with the spec and what is wrong with it.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecError {
    pub spec: String,
    pub reason: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad length spec {:?}: {} (forms: N, fixed:N, uniform:LO:HI, lognormal:MEDIAN:SIGMA[:MIN:MAX], \
             mix:W*SPEC,W*SPEC...)",
            self.spec, self.reason
        )
    }
}

impl std::error::Error for SpecError {}

impl std::str::FromStr for LengthSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let err = |reason: String| SpecError {
            spec: spec.to_string(),
            reason,
        };
        let spec_trimmed = spec.trim();
        let Some(components) = spec_trimmed.strip_prefix("mix:") else {
            return parse_dist(spec_trimmed).map(LengthSpec::Dist).map_err(err);
        };
        let mut mix = Vec::new();
        for component in components.split(',') {
            let Some((weight, dist)) = component.split_once('*') else {
                return Err(err(format!("mix component {component:?} is not WEIGHT*SPEC")));
            };
            let weight: f64 = weight
                .trim()
                .parse()
                .map_err(|_| err(format!("mix weight {weight:?} is not a number")))?;
            if !(weight.is_finite() && weight > 0.0) {
                return Err(err(format!("mix weight {weight} is not positive")));
            }
            let dist = dist.trim();
            if dist.starts_with("mix:") {
                return Err(err("a mix cannot contain a mix".to_string()));
            }
            mix.push((weight, parse_dist(dist).map_err(err)?));
        }
        let total: f64 = mix.iter().map(|(w, _)| w).sum();
        if (total - 1.0).abs() > 1e-6 {
            return Err(err(format!("mix weights sum to {total}; they must sum to 1")));
        }
        Ok(LengthSpec::Mix(mix))
    }
}

fn parse_dist(dist: &str) -> Result<Dist, String> {
    let mut fields = dist.split(':');
    let kind = fields.next().unwrap_or_default();
    let args: Vec<&str> = fields.collect();
    let parsed = match (kind, args.as_slice()) {
        (n, []) if n.chars().next().is_some_and(|c| c.is_ascii_digit()) => Dist::Fixed(length(n)?),
        ("fixed", [n]) => Dist::Fixed(length(n)?),
        ("uniform", [lo, hi]) => {
            let (lo, hi) = (length(lo)?, length(hi)?);
            if lo > hi {
                return Err(format!("uniform range {lo}..{hi} is empty (LO must be <= HI)"));
            }
            Dist::Uniform { lo, hi }
        }
        ("lognormal", [median, sigma, bounds @ ..]) if bounds.is_empty() || bounds.len() == 2 => {
            let median = number(median, "median")?;
            let sigma = number(sigma, "sigma")?;
            if !(1.0..=f64::from(LENGTH_MAX)).contains(&median) {
                return Err(format!("lognormal median {median} is outside 1..={LENGTH_MAX}"));
            }
            if !(0.0..=10.0).contains(&sigma) {
                return Err(format!("lognormal sigma {sigma} is outside 0..=10"));
            }
            let (min, max) = match bounds {
                [min, max] => (length(min)?, length(max)?),
                _ => (1, LENGTH_MAX),
            };
            if min > max {
                return Err(format!("lognormal bounds {min}..{max} are empty (MIN must be <= MAX)"));
            }
            Dist::LogNormal {
                median,
                sigma,
                min,
                max,
            }
        }
        ("fixed" | "uniform" | "lognormal", _) => {
            return Err(format!("{kind} takes {} but got {} field(s)", arity(kind), args.len()));
        }
        _ => return Err(format!("unknown distribution {kind:?}")),
    };
    Ok(parsed)
}

fn arity(kind: &str) -> &'static str {
    match kind {
        "fixed" => "N",
        "uniform" => "LO:HI",
        _ => "MEDIAN:SIGMA or MEDIAN:SIGMA:MIN:MAX",
    }
}

fn length(field: &str) -> Result<u32, String> {
    let n: u64 = field
        .trim()
        .parse()
        .map_err(|_| format!("{field:?} is not a whole number of tokens"))?;
    if n == 0 || n > u64::from(LENGTH_MAX) {
        return Err(format!("length {n} is outside 1..={LENGTH_MAX}"));
    }
    Ok(n as u32)
}

fn number(field: &str, what: &str) -> Result<f64, String> {
    match field.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(format!("{what} {field:?} is not a number")),
    }
}

impl LengthSpec {
    /// Draws one length.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        match self {
            LengthSpec::Dist(dist) => dist.sample(rng),
            LengthSpec::Mix(mix) => {
                let mut u: f64 = rng.random::<f64>();
                for (weight, dist) in mix {
                    if u < *weight {
                        return dist.sample(rng);
                    }
                    u -= weight;
                }
                // Rounding left u just above the last weight.
                mix.last().expect("a parsed mix has components").1.sample(rng)
            }
        }
    }

    /// The largest length this spec can produce.
    pub fn max(&self) -> u32 {
        match self {
            LengthSpec::Dist(dist) => dist.max(),
            LengthSpec::Mix(mix) => mix.iter().map(|(_, d)| d.max()).max().unwrap_or(1),
        }
    }
}

impl Dist {
    fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        match *self {
            Dist::Fixed(n) => n,
            Dist::Uniform { lo, hi } => rng.random_range(lo..=hi),
            Dist::LogNormal {
                median,
                sigma,
                min,
                max,
            } => {
                let z: f64 = StandardNormal.sample(rng);
                let x = (median * (sigma * z).exp()).round();
                x.clamp(f64::from(min), f64::from(max)) as u32
            }
        }
    }

    fn max(&self) -> u32 {
        match *self {
            Dist::Fixed(n) => n,
            Dist::Uniform { hi, .. } => hi,
            Dist::LogNormal { max, .. } => max,
        }
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Dist::Fixed(n) => write!(f, "fixed:{n}"),
            Dist::Uniform { lo, hi } => write!(f, "uniform:{lo}:{hi}"),
            Dist::LogNormal {
                median,
                sigma,
                min: 1,
                max: LENGTH_MAX,
            } => write!(f, "lognormal:{median}:{sigma}"),
            Dist::LogNormal {
                median,
                sigma,
                min,
                max,
            } => write!(f, "lognormal:{median}:{sigma}:{min}:{max}"),
        }
    }
}

/// The canonical spelling, which parses back to the same spec.
impl fmt::Display for LengthSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LengthSpec::Dist(dist) => write!(f, "{dist}"),
            LengthSpec::Mix(mix) => {
                write!(f, "mix:")?;
                for (i, (weight, dist)) in mix.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    write!(f, "{sep}{weight}*{dist}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn parse(s: &str) -> LengthSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn parse_err(s: &str) -> String {
        s.parse::<LengthSpec>().expect_err(s).to_string()
    }

    #[test]
    fn parses_every_form() {
        let cases = [
            ("512", LengthSpec::Dist(Dist::Fixed(512))),
            ("fixed:7", LengthSpec::Dist(Dist::Fixed(7))),
            (
                "uniform:8192:32768",
                LengthSpec::Dist(Dist::Uniform { lo: 8192, hi: 32768 }),
            ),
            (
                "lognormal:512:1.0",
                LengthSpec::Dist(Dist::LogNormal {
                    median: 512.0,
                    sigma: 1.0,
                    min: 1,
                    max: LENGTH_MAX,
                }),
            ),
            (
                "lognormal:512:0.5:16:4096",
                LengthSpec::Dist(Dist::LogNormal {
                    median: 512.0,
                    sigma: 0.5,
                    min: 16,
                    max: 4096,
                }),
            ),
            (
                " mix:0.9*lognormal:512:1.0, 0.1*uniform:8192:32768",
                LengthSpec::Mix(vec![
                    (
                        0.9,
                        Dist::LogNormal {
                            median: 512.0,
                            sigma: 1.0,
                            min: 1,
                            max: LENGTH_MAX,
                        },
                    ),
                    (0.1, Dist::Uniform { lo: 8192, hi: 32768 }),
                ]),
            ),
            (
                "mix:0.1*1,0.2*2,0.7*3",
                LengthSpec::Mix(vec![
                    (0.1, Dist::Fixed(1)),
                    (0.2, Dist::Fixed(2)),
                    (0.7, Dist::Fixed(3)),
                ]),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text), want, "{text}");
            // The canonical spelling parses back to the same spec.
            assert_eq!(parse(&want.to_string()), want, "{want}");
        }
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let cases = [
            ("", "unknown distribution \"\""),
            ("0", "length 0 is outside 1..=16777216"),
            ("fixed:-3", "\"-3\" is not a whole number"),
            ("fixed", "fixed takes N but got 0 field(s)"),
            ("uniform:10", "uniform takes LO:HI but got 1 field(s)"),
            ("uniform:10:5", "uniform range 10..5 is empty"),
            ("uniform:1:99999999999", "length 99999999999 is outside"),
            ("lognormal:512", "lognormal takes MEDIAN:SIGMA"),
            ("lognormal:512:x", "sigma \"x\" is not a number"),
            ("lognormal:512:-1", "sigma -1 is outside 0..=10"),
            ("lognormal:0.5:1", "median 0.5 is outside"),
            ("lognormal:512:1:100:10", "bounds 100..10 are empty"),
            ("gauss:5:1", "unknown distribution \"gauss\""),
            ("mix:0.9*fixed:5", "mix weights sum to 0.9; they must sum to 1"),
            ("mix:0.5*fixed:5,0.5", "mix component \"0.5\" is not WEIGHT*SPEC"),
            ("mix:a*fixed:5", "mix weight \"a\" is not a number"),
            ("mix:0*fixed:5,1*fixed:6", "mix weight 0 is not positive"),
            ("mix:1*mix:1*fixed:5", "a mix cannot contain a mix"),
            ("mix:1*uniform:3", "uniform takes LO:HI"),
        ];
        for (text, want) in cases {
            let got = parse_err(text);
            assert!(got.contains(want), "{text:?}: {got:?} lacks {want:?}");
            assert!(got.contains(&format!("{text:?}")), "{got:?} names the spec");
        }
    }

    fn samples(spec: &str, n: usize) -> Vec<u32> {
        let spec = parse(spec);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        (0..n).map(|_| spec.sample(&mut rng)).collect()
    }

    fn median(xs: &mut [u32]) -> f64 {
        xs.sort_unstable();
        f64::from(xs[xs.len() / 2])
    }

    #[test]
    fn uniform_is_flat_and_inclusive() {
        let xs = samples("uniform:8192:32768", 100_000);
        assert!(xs.iter().all(|&x| (8192..=32768).contains(&x)));
        let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / xs.len() as f64;
        // The standard error of the mean is (32768-8192)/sqrt(12 n) = 22; allow 5 of them.
        assert!((mean - 20480.0).abs() < 110.0, "mean {mean}");
        let xs = samples("uniform:1:2", 10_000);
        let ones = xs.iter().filter(|&&x| x == 1).count();
        assert!((4700..5300).contains(&ones), "{ones} ones of 10000");
        assert!(xs.iter().all(|&x| x == 1 || x == 2));
    }

    #[test]
    fn lognormal_has_the_given_median_and_spread() {
        let mut xs = samples("lognormal:512:1.0", 100_000);
        let m = median(&mut xs);
        assert!((m / 512.0 - 1.0).abs() < 0.02, "median {m}");
        // exp(sigma) is the ratio of the 84th percentile to the median.
        let p84 = f64::from(xs[(0.8413 * xs.len() as f64) as usize]);
        assert!((p84 / m - 1.0f64.exp()).abs() < 0.05, "p84/median {}", p84 / m);
        let xs = samples("lognormal:512:2:100:1000", 10_000);
        assert!(xs.iter().all(|&x| (100..=1000).contains(&x)));
        assert!(xs.contains(&100) && xs.contains(&1000), "clamping reaches both bounds");
    }

    #[test]
    fn mix_draws_components_by_weight() {
        let xs = samples("mix:0.9*fixed:512,0.1*uniform:8192:32768", 100_000);
        let long = xs.iter().filter(|&&x| x >= 8192).count() as f64 / xs.len() as f64;
        assert!((long - 0.1).abs() < 0.005, "long share {long}");
        assert!(xs.iter().all(|&x| x == 512 || (8192..=32768).contains(&x)));
    }

    #[test]
    fn max_is_the_largest_possible_length() {
        assert_eq!(parse("mix:0.5*fixed:5,0.5*uniform:1:9").max(), 9);
        assert_eq!(parse("lognormal:5:1").max(), LENGTH_MAX);
    }
}

"""Seed statistics with no scipy: mean, sample std, t confidence intervals, Welch's t-test, the challenge rule.

Student's t distribution is computed from the regularized incomplete beta function (continued fraction,
modified Lentz), its quantile by bisection then Newton steps on that CDF. The challenge's rule: a new
result must beat the baseline by at least 0.005 nats of val_loss at p < 0.01, one-sided.
"""

import math
from dataclasses import dataclass

from pgolf.errors import UserError

CHALLENGE_MARGIN_NATS = 0.005
CHALLENGE_ALPHA = 0.01


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz); converges for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        # even step
        num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        result *= d * c
        # odd step
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        result *= step
        if abs(step - 1.0) < 1e-15:
            break
    return result


def betainc_regularized(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc_regularized needs a, b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (df may be fractional, as in Welch's test)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc_regularized(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    return student_t_sf(-t, df)


def student_t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t: bracket, bisect, then polish with Newton steps on the CDF."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"student_t_ppf needs 0 < q < 1, got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -student_t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    for _ in range(3):
        pdf = math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))
        if pdf <= 0:
            break
        t -= (student_t_cdf(t, df) - q) / pdf
    return t


def sample_mean(values) -> float:
    values = list(values)
    if not values:
        raise UserError("cannot take the mean of no values")
    return math.fsum(values) / len(values)


def sample_std(values) -> float:
    """Sample standard deviation (n - 1 in the denominator); 0.0 for a single value."""
    values = list(values)
    if len(values) < 2:
        return 0.0
    m = sample_mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t confidence interval); half-width is nan for fewer than 2 values."""
    values = list(values)
    m = sample_mean(values)
    n = len(values)
    if n < 2:
        return m, float("nan")
    half = student_t_ppf(0.5 + level / 2.0, n - 1) * sample_std(values) / math.sqrt(n)
    return m, half


@dataclass
class WelchResult:
    """Welch's unequal-variance t-test of arm a against arm b (diff = mean_a - mean_b - shift)."""

    diff: float
    t: float
    df: float
    p_two_sided: float
    p_less: float  # H1: mean_a - shift < mean_b
    p_greater: float  # H1: mean_a - shift > mean_b


def welch_ttest(a, b, shift: float = 0.0) -> WelchResult:
    """Welch's t-test of H0: mean_a - mean_b == shift; each arm needs at least 2 values."""
    a, b = list(a), list(b)
    if len(a) < 2 or len(b) < 2:
        raise UserError(f"Welch's t-test needs at least 2 values per arm, got {len(a)} and {len(b)}")
    va, vb = sample_std(a) ** 2 / len(a), sample_std(b) ** 2 / len(b)
    diff = sample_mean(a) - sample_mean(b) - shift
    se2 = va + vb
    if se2 == 0.0:
        t = math.copysign(math.inf, diff) if diff else 0.0
        df = float(len(a) + len(b) - 2)
    else:
        t = diff / math.sqrt(se2)
        df = se2 * se2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    if t == 0.0 and diff == 0.0 and se2 == 0.0:
        return WelchResult(diff, t, df, 1.0, 0.5, 0.5)
    p_greater = student_t_sf(t, df)
    p_less = student_t_cdf(t, df)
    return WelchResult(diff, t, df, min(1.0, 2.0 * min(p_less, p_greater)), p_less, p_greater)


@dataclass
class PairedResult:
    """A paired t-test of arm a against arm b: the per-pair differences a_i - b_i against 0."""

    diff: float  # mean of a_i - b_i
    t: float
    df: float
    p_two_sided: float


def paired_ttest(a, b) -> PairedResult:
    """Student's paired t-test of H0: mean(a_i - b_i) == 0 over matched values (e.g. runs of the same seed)."""
    a, b = list(a), list(b)
    if len(a) != len(b) or len(a) < 2:
        raise UserError(f"a paired t-test needs two equally long lists of at least 2 values, got {len(a)} and "
                        f"{len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    diff, sd, n = sample_mean(d), sample_std(d), len(d)
    if sd == 0.0:
        t = math.copysign(math.inf, diff) if diff else 0.0
        return PairedResult(diff, t, float(n - 1), 1.0 if diff == 0.0 else 0.0)
    t = diff / (sd / math.sqrt(n))
    return PairedResult(diff, t, float(n - 1), min(1.0, 2.0 * student_t_sf(abs(t), n - 1)))


@dataclass
class RuleResult:
    """The challenge rule applied to a new arm against a baseline arm (lower loss is better)."""

    improvement: float  # mean_base - mean_new, nats
    t: float
    df: float
    p: float  # one-sided p of H0: mean_new >= mean_base - margin
    passes: bool


def challenge_rule(new, base, margin: float = CHALLENGE_MARGIN_NATS, alpha: float = CHALLENGE_ALPHA) -> RuleResult:
    """One-sided Welch test of H0: mean_new >= mean_base - margin; passes when p < alpha."""
    w = welch_ttest(new, base, shift=-margin)
    improvement = sample_mean(base) - sample_mean(new)
    return RuleResult(improvement, w.t, w.df, w.p_less, w.p_less < alpha)


def seeds_needed(effect: float, std: float, alpha: float = CHALLENGE_ALPHA, power: float = 0.8,
                 max_n: int = 10_000) -> int:
    """Seeds per arm for a one-sided two-sample t-test to detect `effect` with the given power.

    `effect` is the true difference beyond the margin under test (for the challenge rule: improvement minus
    0.005 nats); `std` the per-seed standard deviation, assumed equal in both arms. Power is the usual
    shifted-t approximation P(T_df > t_{1-alpha,df} - effect / (std * sqrt(2/n))), df = 2n - 2.
    """
    if effect <= 0 or std < 0:
        raise UserError(f"seeds_needed needs effect > 0 and std >= 0, got effect={effect}, std={std}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise UserError(f"seeds_needed needs 0 < alpha, power < 1, got alpha={alpha}, power={power}")
    if std == 0:
        return 2
    for n in range(2, max_n + 1):
        df = 2 * n - 2
        shift = effect / (std * math.sqrt(2.0 / n))
        if student_t_sf(student_t_ppf(1.0 - alpha, df) - shift, df) >= power:
            return n
    raise UserError(f"seeds_needed: more than {max_n} seeds per arm for effect={effect}, std={std}")

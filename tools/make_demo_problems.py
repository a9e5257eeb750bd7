"""Generate ``sgsd/assets/demo_problems.jsonl``: the bundled offline demo problem set.

Every problem is built from a template with seeded random parameters and its answer is
*computed* (integers, ``fractions.Fraction``, ``math.comb``...), so answers are correct by
construction. Each row also carries a one-line worked solution ending in ``\\boxed{...}``
(usable as the OPSD reference solution).

Run from the repository root (deterministic: the same output on every run)::

    python tools/make_demo_problems.py            # rewrite the asset
    python tools/make_demo_problems.py --check    # exit 1 if the asset is out of date
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from fractions import Fraction
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "sgsd" / "assets" / "demo_problems.jsonl"
SEED = 20261125
PER_TEMPLATE = 10


def tex(x: Fraction | int) -> str:
    """LaTeX for an exact rational: ``7``, ``\\frac{3}{4}``, ``-\\frac{1}{2}``."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def poly(*coeffs: int) -> str:
    """``poly(1, -3, 0)`` -> ``x^2 - 3x`` (zero terms dropped, signs tidy)."""
    deg = len(coeffs) - 1
    out = ""
    for i, c in enumerate(coeffs):
        p = deg - i
        if c == 0:
            continue
        mono = "" if p == 0 else ("x" if p == 1 else f"x^{p}")
        mag = abs(c)
        body = f"{mag}{mono}" if (mag != 1 or not mono) else mono
        if not out:
            out = ("-" if c < 0 else "") + body
        else:
            out += (" - " if c < 0 else " + ") + body
    return out or "0"


def num_divisors(n: int) -> int:
    return sum(1 for d in range(1, n + 1) if n % d == 0)


def sum_divisors(n: int) -> int:
    return sum(d for d in range(1, n + 1) if n % d == 0)


# Each template: rng -> (problem, answer, solution). Grouped by subject.
def t_mul_add(r):
    a, b, c = r.randint(12, 99), r.randint(12, 99), r.randint(10, 999)
    ans = a * b + c
    return (
        f"Compute ${a} \\times {b} + {c}$.",
        str(ans),
        (
            f"${a} \\times {b} = {a * b}$, and ${a * b} + {c} = {ans}$. So the answer is "
            f"$\\boxed{{{ans}}}$."
        ),
    )


def t_frac_add(r):
    a, b = r.randint(1, 9), r.randint(2, 12)
    c, d = r.randint(1, 9), r.randint(2, 12)
    s = Fraction(a, b) + Fraction(c, d)
    return (
        (
            f"Compute $\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}}$. Express your answer as a "
            "common fraction in lowest terms (or an integer)."
        ),
        tex(s),
        (f"With common denominator {b * d // math.gcd(b, d)}, the sum is $\\boxed{{{tex(s)}}}$."),
    )


def t_percent(r):
    p = r.choice([5, 10, 12, 15, 20, 25, 30, 40, 45, 60, 75, 80])
    n = (100 // math.gcd(p, 100)) * r.randint(2, 40)  # so that p% of n is an integer
    ans = p * n // 100
    assert ans * 100 == p * n
    return (
        f"What is ${p}\\%$ of ${n}$?",
        str(ans),
        f"${p}\\%$ of ${n}$ is $\\frac{{{p}}}{{100}} \\cdot {n} = \\boxed{{{ans}}}$.",
    )


def t_diff_squares(r):
    a = r.randint(30, 120)
    b = r.randint(10, a - 1)
    ans = a * a - b * b
    return (
        f"Compute ${a}^2 - {b}^2$.",
        str(ans),
        (f"${a}^2 - {b}^2 = ({a} - {b})({a} + {b}) = {a - b} \\cdot {a + b} = \\boxed{{{ans}}}$."),
    )


def t_order_ops(r):
    a, b, c, d = r.randint(2, 9), r.randint(2, 9), r.randint(2, 20), r.randint(1, 9)
    ans = a**2 * b - c + d * (a + b)
    return (
        f"Evaluate ${a}^2 \\cdot {b} - {c} + {d}({a} + {b})$.",
        str(ans),
        (
            f"${a * a} \\cdot {b} - {c} + {d} \\cdot {a + b} = {a * a * b} - {c} + "
            f"{d * (a + b)} = \\boxed{{{ans}}}$."
        ),
    )


def t_linear(r):
    a = r.choice([k for k in range(-9, 10) if k not in (-1, 0, 1)])
    x = r.randint(-20, 20)
    b = r.randint(-30, 30)
    c = a * x + b
    return (
        f"Solve for $x$: ${poly(a, b)} = {c}$.",
        str(x),
        f"${a}x = {c - b}$, so $x = \\boxed{{{x}}}$.",
    )


def t_roots_squares(r):
    p, q = r.randint(-9, 9), r.randint(-9, 9)
    s, prod = p + q, p * q
    ans = s * s - 2 * prod
    return (
        f"Let $r$ and $s$ be the roots of ${poly(1, -s, prod)} = 0$. Compute $r^2 + s^2$.",
        str(ans),
        (
            f"By Vieta, $r + s = {s}$ and $rs = {prod}$, so $r^2 + s^2 = ({s})^2 - 2({prod}) = "
            f"\\boxed{{{ans}}}$."
        ),
    )


def t_system(r):
    x, y = r.randint(-15, 15), r.randint(-15, 15)
    return (
        f"If $x + y = {x + y}$ and $x - y = {x - y}$, what is $xy$?",
        str(x * y),
        f"Adding, $x = {x}$; then $y = {y}$, so $xy = \\boxed{{{x * y}}}$.",
    )


def t_arith_seq(r):
    a, d, n = r.randint(-10, 20), r.randint(-5, 9), r.randint(10, 40)
    total = n * (2 * a + (n - 1) * d) // 2
    return (
        (
            f"An arithmetic sequence has first term ${a}$ and common difference ${d}$. "
            f"What is the sum of its first ${n}$ terms?"
        ),
        str(total),
        (
            f"The sum is $\\frac{{{n}}}{{2}}(2 \\cdot {a} + {n - 1} \\cdot {d}) = "
            f"\\boxed{{{total}}}$."
        ),
    )


def t_poly_eval(r):
    a, b, c, k = r.randint(1, 6), r.randint(-9, 9), r.randint(-20, 20), r.randint(-6, 6)
    ans = a * k * k + b * k + c
    return (
        f"If $f(x) = {poly(a, b, c)}$, what is $f({k})$?",
        str(ans),
        f"$f({k}) = {a}({k})^2 + ({b})({k}) + ({c}) = \\boxed{{{ans}}}$.",
    )


def t_frac_equation(r):
    a, b = r.randint(2, 9), r.randint(2, 9)
    c = r.randint(1, 12)
    x = Fraction(c * a * b, a + b)  # x/a + x/b = c
    return (
        (
            f"Solve for $x$: $\\frac{{x}}{{{a}}} + \\frac{{x}}{{{b}}} = {c}$. Express your "
            "answer as a common fraction in lowest terms (or an integer)."
        ),
        tex(x),
        f"$x \\cdot \\frac{{{a + b}}}{{{a * b}}} = {c}$, so $x = \\boxed{{{tex(x)}}}$.",
    )


def t_pow_mod(r):
    a, e, m = r.randint(2, 19), r.randint(20, 999), r.choice([7, 9, 10, 11, 13, 100, 1000])
    ans = pow(a, e, m)
    return (
        f"What is the remainder when ${a}^{{{e}}}$ is divided by ${m}$?",
        str(ans),
        f"Powers of ${a}$ modulo ${m}$ are periodic; reducing gives $\\boxed{{{ans}}}$.",
    )


def t_gcd(r):
    g = r.randint(2, 30)
    a, b = g * r.randint(2, 30), g * r.randint(2, 30)
    ans = math.gcd(a, b)
    return (
        f"What is the greatest common divisor of ${a}$ and ${b}$?",
        str(ans),
        f"By the Euclidean algorithm, $\\gcd({a}, {b}) = \\boxed{{{ans}}}$.",
    )


def t_lcm(r):
    a, b = r.randint(4, 60), r.randint(4, 60)
    ans = a * b // math.gcd(a, b)
    return (
        f"What is the least common multiple of ${a}$ and ${b}$?",
        str(ans),
        (
            f"$\\operatorname{{lcm}}({a}, {b}) = \\frac{{{a} \\cdot {b}}}{{{math.gcd(a, b)}}} "
            f"= \\boxed{{{ans}}}$."
        ),
    )


def t_num_divisors(r):
    n = r.randint(24, 720)
    ans = num_divisors(n)
    return (
        f"How many positive divisors does ${n}$ have?",
        str(ans),
        f"From the prime factorisation of ${n}$, the count is $\\boxed{{{ans}}}$.",
    )


def t_sum_divisors(r):
    n = r.randint(10, 200)
    ans = sum_divisors(n)
    return (
        f"What is the sum of all positive divisors of ${n}$?",
        str(ans),
        f"Adding the divisors of ${n}$ gives $\\boxed{{{ans}}}$.",
    )


def t_units_digit(r):
    a, e = r.randint(2, 99), r.randint(10, 500)
    ans = pow(a, e, 10)
    return (
        f"What is the units digit of ${a}^{{{e}}}$?",
        str(ans),
        (f"The last digit of powers of ${a}$ cycles; ${a}^{{{e}}} \\bmod 10 = \\boxed{{{ans}}}$."),
    )


def t_choose(r):
    n = r.randint(5, 20)
    k = r.randint(2, min(6, n - 1))
    ans = math.comb(n, k)
    return (
        (
            f"In how many ways can a committee of ${k}$ people be chosen from a group of "
            f"${n}$ people?"
        ),
        str(ans),
        f"$\\binom{{{n}}}{{{k}}} = \\boxed{{{ans}}}$.",
    )


def t_div_count(r):
    a, b = r.sample([2, 3, 4, 5, 6, 7, 9, 11], 2)
    n = r.randint(50, 500)
    ans = n // a + n // b - n // (a * b // math.gcd(a, b))
    return (
        (
            f"How many positive integers less than or equal to ${n}$ are divisible by ${a}$ "
            f"or ${b}$?"
        ),
        str(ans),
        (
            f"By inclusion-exclusion, $\\lfloor {n}/{a} \\rfloor + \\lfloor {n}/{b} \\rfloor - "
            f"\\lfloor {n}/{a * b // math.gcd(a, b)} \\rfloor = \\boxed{{{ans}}}$."
        ),
    )


_WORDS = [
    "LEVEL",
    "BANANA",
    "LETTER",
    "APPLE",
    "COFFEE",
    "BOOK",
    "MISSISSIPPI",
    "BALLOON",
    "TOOTH",
    "SEVEN",
    "ALGEBRA",
    "GEOMETRY",
    "PEPPER",
    "COMMITTEE",
    "PARABOLA",
    "ARRAY",
    "EERIE",
    "PUZZLE",
    "TATTOO",
    "CALCULUS",
    "RADAR",
    "ELEVEN",
    "SUCCESS",
    "STATISTICS",
]


def t_anagrams(r):
    w = r.choice(_WORDS)
    ans = math.factorial(len(w))
    for ch in set(w):
        ans //= math.factorial(w.count(ch))
    return (
        f"How many distinct arrangements of the letters of the word {w} are there?",
        str(ans),
        (
            f"${len(w)}!$ divided by the factorials of the letter multiplicities gives "
            f"$\\boxed{{{ans}}}$."
        ),
    )


def t_stars_bars(r):
    k, n = r.randint(2, 5), r.randint(3, 15)
    ans = math.comb(n + k - 1, k - 1)
    var = " + ".join(f"x_{i}" for i in range(1, k + 1))
    return (
        f"How many ordered solutions in nonnegative integers does ${var} = {n}$ have?",
        str(ans),
        f"By stars and bars, $\\binom{{{n + k - 1}}}{{{k - 1}}} = \\boxed{{{ans}}}$.",
    )


def t_dice_prob(r):
    s = r.randint(2, 12)
    count = sum(1 for a in range(1, 7) for b in range(1, 7) if a + b == s)
    p = Fraction(count, 36)
    return (
        (
            f"Two fair six-sided dice are rolled. What is the probability that the sum is "
            f"${s}$? Express your answer as a common fraction."
        ),
        tex(p),
        f"{count} of the 36 outcomes give {s}, so the probability is $\\boxed{{{tex(p)}}}$.",
    )


def t_hypotenuse(r):
    m = r.randint(2, 8)
    n = r.randint(1, m - 1)
    k = r.randint(1, 4)
    a, b, c = k * (m * m - n * n), k * 2 * m * n, k * (m * m + n * n)
    return (
        (
            f"A right triangle has legs of length ${a}$ and ${b}$. What is the length of its "
            "hypotenuse?"
        ),
        str(c),
        f"$\\sqrt{{{a}^2 + {b}^2}} = \\sqrt{{{c * c}}} = \\boxed{{{c}}}$.",
    )


def t_rect_area(r):
    a, b = r.randint(2, 40), r.randint(2, 40)
    return (
        (
            f"A rectangle has perimeter ${2 * (a + b)}$ and one side of length ${a}$. What is "
            "its area?"
        ),
        str(a * b),
        (f"The other side is ${a + b} - {a} = {b}$, so the area is $\\boxed{{{a * b}}}$."),
    )


def t_triangle_area(r):
    pts = [(r.randint(-8, 8), r.randint(-8, 8)) for _ in range(3)]
    (x1, y1), (x2, y2), (x3, y3) = pts
    twice = abs(x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))
    if twice == 0:
        return None  # collinear: draw again
    area = Fraction(twice, 2)
    return (
        (
            f"What is the area of the triangle with vertices $({x1}, {y1})$, $({x2}, {y2})$ "
            f"and $({x3}, {y3})$?"
        ),
        tex(area),
        (f"By the shoelace formula the area is $\\frac{{{twice}}}{{2}} = \\boxed{{{tex(area)}}}$."),
    )


def t_polygon_angles(r):
    n = r.randint(5, 30)
    ans = (n - 2) * 180
    return (
        (
            f"What is the sum of the interior angles, in degrees, of a convex polygon with "
            f"${n}$ sides?"
        ),
        str(ans),
        f"$({n} - 2) \\cdot 180 = \\boxed{{{ans}}}$.",
    )


def t_circle(r):
    rad = r.randint(2, 30)
    return (
        (
            f"A circle has area ${rad * rad}\\pi$. What is its circumference? Express your "
            "answer in terms of $\\pi$."
        ),
        f"{2 * rad}\\pi",
        f"The radius is ${rad}$, so the circumference is $\\boxed{{{2 * rad}\\pi}}$.",
    )


def t_distance(r):
    m = r.randint(2, 7)
    n = r.randint(1, m - 1)
    dx, dy = m * m - n * n, 2 * m * n
    x1, y1 = r.randint(-10, 10), r.randint(-10, 10)
    sx, sy = r.choice([-1, 1]), r.choice([-1, 1])
    x2, y2 = x1 + sx * dx, y1 + sy * dy
    return (
        f"What is the distance between the points $({x1}, {y1})$ and $({x2}, {y2})$?",
        str(m * m + n * n),
        f"$\\sqrt{{{dx}^2 + {dy}^2}} = \\boxed{{{m * m + n * n}}}$.",
    )


def t_box_surface(r):
    a, b, c = r.randint(2, 12), r.randint(2, 12), r.randint(2, 12)
    ans = 2 * (a * b + b * c + a * c)
    return (
        (f"A rectangular box measures ${a}$ by ${b}$ by ${c}$. What is its total surface area?"),
        str(ans),
        f"$2({a * b} + {b * c} + {a * c}) = \\boxed{{{ans}}}$.",
    )


TEMPLATES = {
    "arithmetic": [t_mul_add, t_frac_add, t_percent, t_diff_squares, t_order_ops],
    "algebra": [t_linear, t_roots_squares, t_system, t_arith_seq, t_poly_eval, t_frac_equation],
    "number_theory": [t_pow_mod, t_gcd, t_lcm, t_num_divisors, t_sum_divisors, t_units_digit],
    "counting": [t_choose, t_div_count, t_anagrams, t_stars_bars, t_dice_prob],
    "geometry": [
        t_hypotenuse,
        t_rect_area,
        t_triangle_area,
        t_polygon_angles,
        t_circle,
        t_distance,
        t_box_surface,
    ],
}


def generate() -> list[dict]:
    rng = random.Random(SEED)
    rows, seen = [], set()
    for subject, templates in TEMPLATES.items():
        for template in templates:
            made = 0
            while made < PER_TEMPLATE:
                out = template(rng)
                if out is None or out[0] in seen:
                    continue
                problem, answer, solution = out
                seen.add(problem)
                rows.append(
                    {
                        "id": f"demo-{len(rows) + 1:04d}",
                        "problem": problem,
                        "answer": answer,
                        "solution": solution,
                        "subject": subject,
                    }
                )
                made += 1
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the asset is out of date")
    args = ap.parse_args(argv)
    text = render(generate())
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is out of date: run python tools/make_demo_problems.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} problems to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Would an audit rate that falls over the stream cost fewer LLM calls?

A simulation, not the Rust controller: students that disagree with the LLM
on a share p of the items they answer, and answer every item the bound
allows (the regime where the bound, not the gates, limits them). The bound
is the one in crates/cascade/src/target.rs generalised to a predictable
audit rate alpha_i per answer: for a bet lambda, with c_a = -ln(1 - a(1 -
e^{-lambda/a})), Ville's inequality gives sum_{disagreeing i} c_{alpha_i}
<= lambda * S + ln(1/delta'), S the audited disagreements weighted 1/alpha.
The unaudited answers' disagreements are unknown, so the bound takes the
worst case: they sit on the answers with the lowest rates first (smallest
c), which is why a low late rate widens the bound for the whole stream.

    scripts/audit_schedule_sim.py --target 0.95 --p 0.04 --seeds 3

Prints LLM calls (audits included), audits and realized agreement per
schedule. Measured (stop 36): a constant 0.2 was cheapest of the schedules
below at 0.95 and 0.98 (results/guarantee.md).
"""
import argparse
import math
import random

BETS = [0.02, 0.04, 0.08, 0.16, 0.32]


def c(rate, bet):
    return -math.log1p(-rate * (1.0 - math.exp(-bet / rate)))


class Bound:
    def __init__(self, target, delta):
        self.target = target
        self.log_term = math.log(len(BETS) / delta)
        self.unaudited = {}  # rate -> answers not audited
        self.disagreed = {}  # rate -> audited disagreements
        self.items = 0
        self.corrected = 0

    def errors(self, extra_audited_wrong=None):
        disagreed = dict(self.disagreed)
        if extra_audited_wrong is not None:
            disagreed[extra_audited_wrong] = disagreed.get(extra_audited_wrong, 0) + 1
        best = math.inf
        for bet in BETS:
            room = self.log_term
            errors = 0.0
            for rate, k in disagreed.items():
                room += k * (bet / rate - c(rate, bet))
                errors += k
            for rate in sorted(self.unaudited):
                cost = c(rate, bet)
                take = min(self.unaudited[rate], room / cost)
                errors += take
                room -= take * cost
                if room <= 0:
                    break
            best = min(best, errors)
        return best

    def must_defer(self, rate):
        kept = self.errors(rate) - self.corrected
        return kept > (1 - self.target) * (self.items + 1)

    def answer(self, rate, disagrees, audited):
        """A student answer drawn at `rate`: an audited disagreement is
        corrected; returns whether the answer keeps a disagreement."""
        if audited:
            if disagrees:
                self.disagreed[rate] = self.disagreed.get(rate, 0) + 1
                self.corrected += 1
            return False
        self.unaudited[rate] = self.unaudited.get(rate, 0) + 1
        return disagrees


def run(target, p, schedule, n, seed, delta=0.04):
    rng = random.Random(seed)
    bound = Bound(target, delta)
    calls = audits = answers = kept = 0
    for _ in range(n):
        rate = schedule(answers)
        defer = bound.must_defer(rate)
        bound.items += 1
        if defer:
            calls += 1
            continue
        answers += 1
        disagrees = rng.random() < p
        audited = rng.random() < rate
        calls += audited
        audits += audited
        kept += bound.answer(rate, disagrees, audited)
    return calls, audits, 1 - kept / n


SCHEDULES = {
    "constant 0.2": lambda s: 0.2,
    "constant 0.15": lambda s: 0.15,
    "constant 0.3": lambda s: 0.3,
    "0.3 -> 0.1 as 1/sqrt(answers)": lambda s: max(0.1, min(0.3, 0.3 * math.sqrt(1000 / (s + 1)))),
    "0.4, 0.3, 0.2, 0.15, 0.1 per 1,500 answers": lambda s: [0.4, 0.3, 0.2, 0.15, 0.1][min(4, s // 1500)],
    "0.3, 0.25, 0.2, 0.15 per 2,000 answers": lambda s: [0.3, 0.25, 0.2, 0.15][min(3, s // 2000)],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--p", type=float, default=0.04, help="students' disagreement rate")
    parser.add_argument("--items", type=int, default=12500)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"target {args.target}, students disagree on {args.p} of their answers, "
          f"{args.items} items, {args.seeds} seeds (means)")
    print("| schedule | LLM calls | audits | realized agreement (lowest) |")
    print("|---|---|---|---|")
    for name, schedule in SCHEDULES.items():
        runs = [run(args.target, args.p, schedule, args.items, seed) for seed in range(args.seeds)]
        calls = sum(r[0] for r in runs) / len(runs)
        audits = sum(r[1] for r in runs) / len(runs)
        print(f"| {name} | {calls:.0f} | {audits:.0f} | {min(r[2] for r in runs):.4f} |", flush=True)


if __name__ == "__main__":
    main()

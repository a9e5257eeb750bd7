"""Skill world: a procedural task family where SGSD's claims can show up or fail to, in
minutes on a CPU (docs/skillworld.md).

* :mod:`sgsd.skillworld.tasks`      -- the digit operations and the seeded problem splits
* :mod:`sgsd.skillworld.bank`       -- its skill bank: rules, misleading rules, mistakes
* :mod:`sgsd.skillworld.warm_start` -- the tiny model taught to follow a rule in context
"""

"""``python -m sgsd.build_skill_bank``: the cold-start skill-bank command
(:mod:`sgsd.skills.cold_start`)."""

if __name__ == "__main__":
    from sgsd.skills.cold_start import main

    raise SystemExit(main())

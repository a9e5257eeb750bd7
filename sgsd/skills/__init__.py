"""The skill bank and its life cycle (docs/skill-bank.md).

* :mod:`sgsd.skills.bank`          -- the bank (published format), BM25 teacher retrieval
* :mod:`sgsd.skills.bm25`          -- BM25 over math-aware tokens
* :mod:`sgsd.skills.extraction`    -- memory records, LLM extraction of skills / mistakes
* :mod:`sgsd.skills.merge`         -- hierarchical LLM merge of skills or mistakes
* :mod:`sgsd.skills.online_update` -- the online update every ``skill_update_every`` steps
* :mod:`sgsd.skills.cold_start`    -- the cold-start builder (``python -m sgsd.build_skill_bank``)
* :mod:`sgsd.skills.json_reply`    -- one JSON object out of a model's free-text reply

Nothing here imports the training loop; the loop imports the bank and the online update.
"""

"""What the recipes share, imported as ``tools.<module>`` (``run.sh`` puts the repository root on
PYTHONPATH through ``tools/recipe_common.sh``; tests run from the root).

- ``build_models``: tokenizer + tiny teacher/student Qwen2-Audio models of a recipe's stage 1;
- ``prep_common``: errors, side files and command lines of the corpus prep scripts;
- ``hyps``: decode hypothesis files and their match with a manifest;
- ``compute_wer``, ``plot_metrics``, ``report`` (results tables, ``RESULTS.md``, README refresh);
- ``local_module``: a recipe's ``local/`` scripts loading their siblings under unique names;
- ``synth``: speech (espeak-ng), sound (sox) and video (ffmpeg) makers for synthetic corpora;
- shell: ``parse_options.sh`` (``--name value`` options) and ``recipe_common.sh`` (environment,
  ``log``, ``train``, ``fresh`` ... for every ``run.sh``).

A recipe's ``local/`` imports ``core`` and ``tools`` only, never another recipe.
"""

"""What is measured on a model: codes and neurons as classifiers (``classifiers``, ``neurons``,
``heldout``), feature labels (``labels``, regex ``features``), the dictionary metrics
(``metrics``, run over a corpus by ``metrics_job``), the logit lens, plots, and the FSM
experiment (``fsm``).

May import the core (``codebook.*`` modules, ``codebook.data``) and the rest of its floor
(``codebook.training``, ``compare``, ``steering``); never ``codebook.store``,
``codebook.browser``, ``codebook.ray_glue``, Ray or the entry points (the code store's readers
live one floor up, in ``codebook.store``).
"""

"""The ensemble stage: voting rules (``rules``, numpy only), the pair/weight/rule search on stored
probabilities (``search``), the ensemble run of a session (``stage``) and the served pyfunc model
(``pyfunc``). Kept import-free so config can read the rule table without loading MLflow."""

"""Training: the oracle block and the LM block (:mod:`.blocks`), the versioned exchange
directory (:mod:`.exchange`), the sequential and parallel schedules (:mod:`.run`) and the whole
run with baseline, evaluation and summary (:mod:`.driver`)."""

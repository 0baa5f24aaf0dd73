"""The method's loops over the model's interface: the oracle block and the LM block
(:mod:`.blocks`), the sequential and the parallel schedule (:mod:`.schedules`), the baselines as
compositions (:mod:`.baselines`), the phases of a run (:mod:`.phases`), and the exchange
between the two groups (:mod:`.exchange`, :mod:`.coordination`)."""

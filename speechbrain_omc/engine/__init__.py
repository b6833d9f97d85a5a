"""The engine: compressed parameters of a module, their updates and plans.

It builds on the codec (:mod:`speechbrain_omc.codec`) and knows nothing of
SpeechBrain, which :mod:`speechbrain_omc.brain` wires it to.
"""

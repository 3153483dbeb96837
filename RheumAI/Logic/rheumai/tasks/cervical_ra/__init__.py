"""The cervical RA deformity task (Lebouille-Veldman et al. 2025): declaration (:mod:`.task`) and
prediction hooks (:mod:`.predict`); training is :func:`rheumai.train.train` on the engine."""

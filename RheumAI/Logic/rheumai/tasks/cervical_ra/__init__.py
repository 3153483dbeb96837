"""The cervical RA deformity task (Lebouille-Veldman et al. 2025): declaration (:mod:`.task`), prediction
hooks (:mod:`.predict`) and its recipe on the engine's binary training (:mod:`.train`)."""

"""Hand radiograph SvdH scoring (Bo, Coates, Papiez): whole-hand total + severity class, per-joint path."""

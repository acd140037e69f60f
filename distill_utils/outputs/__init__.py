"""What a run leaves for people: the released-set export, plots, image grids and decoded captions."""

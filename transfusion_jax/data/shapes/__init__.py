"""The embedded shapes world: scenes of coloured shapes on a grid, rendered (`world`), told in
text (`text`: captions, questions, the text corpus), read back by parsers (`world.parse_image`,
`text.parse_caption`), and the held-out scenes that evaluations use (`heldout`)."""

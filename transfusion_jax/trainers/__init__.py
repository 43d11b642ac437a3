"""Trainers: thin loops over core/ (`transfusion`, `autoencoder`). Only entry points import
them."""

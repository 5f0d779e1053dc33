# %% [markdown]
# # maml_vs_fomaml
#
# This tutorial is being written (a stub in the site skeleton commit).

# %%
print("stub")

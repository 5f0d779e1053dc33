# %% [markdown]
# # memory_efficient_maml
#
# This tutorial is being written (a stub in the site skeleton commit).

# %%
print("stub")

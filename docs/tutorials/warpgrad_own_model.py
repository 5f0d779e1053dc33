# %% [markdown]
# # warpgrad_own_model
#
# This tutorial is being written (a stub in the site skeleton commit).

# %%
print("stub")

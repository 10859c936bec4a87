
¬
@1c6925367820d495a55b3ad911b7e52db964e55cbca305401174aee0d937c4e9#
web-0uid-web-0-1234
fixture-ns ÂÁ„Ø¢ÑÙö*

appweb2
netfault.io/loss10%2
example.com/xy
²
@28a504257d6390a6670f85efb49ef12241fbf0bac10a763deaad39c690f01740+
	hostnet-0uid-hostnet-0-1234
fixture-ns †ñš„£ÑÙö*

appweb2
netfault.io/loss10%2
example.com/xy
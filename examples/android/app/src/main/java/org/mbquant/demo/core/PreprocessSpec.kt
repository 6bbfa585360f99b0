package org.mbquant.demo.core

/** The bundle's preprocessing contract (preprocess.json, format mbquant-preprocess/1), checked when read. */
class PreprocessSpec(
    val height: Int,
    val width: Int,
    val grayscale: Boolean,
    val stretch: Boolean,
    val shorterSide: Int,
    val mean: FloatArray,
    val std: FloatArray
) {
    companion object {
        const val FORMAT = "mbquant-preprocess/1"

        /** Parses preprocess.json; a BundleException(CORRUPT) names what is wrong. */
        fun parse(text: String): PreprocessSpec {
            val root = try { Json.parse(text) } catch (e: JsonException) {
                throw BundleException(BundleProblem.CORRUPT, "preprocess.json is not valid JSON: ${e.message}")
            } as? Map<*, *> ?: throw BundleException(BundleProblem.CORRUPT, "preprocess.json is not an object")
            if (root["format"] != FORMAT) {
                throw BundleException(BundleProblem.CORRUPT, "preprocess.json has format ${root["format"]}, expected $FORMAT")
            }
            val shape = ((root["input"] as? Map<*, *>)?.get("shape") as? List<*>)?.map { (it as? Double)?.toInt() }
            if (shape == null || shape.size != 4 || shape[0] != 1 || shape[1] != 3 || shape.any { it == null || it <= 0 }) {
                throw BundleException(BundleProblem.WRONG_INPUT, "preprocess.json input.shape $shape is not [1, 3, H, W]")
            }
            val color = (root["color"] as? Map<*, *>)?.get("mode")
            val resize = root["resize"] as? Map<*, *>
            val policy = resize?.get("policy")
            if (color != "grayscale" && color != "rgb") throw BundleException(BundleProblem.CORRUPT, "unknown color mode $color")
            if (policy != "stretch" && policy != "shorter-side-then-center-crop") {
                throw BundleException(BundleProblem.CORRUPT, "unknown resize policy $policy")
            }
            val mean = floats(root["mean"], "mean")
            val std = floats(root["std"], "std")
            if (std.any { it <= 0f }) throw BundleException(BundleProblem.CORRUPT, "std must be positive")
            val shorter = if (policy == "stretch") 0 else ((resize["shorter_side"] as? Double)?.toInt()
                ?: throw BundleException(BundleProblem.CORRUPT, "resize.shorter_side is missing"))
            return PreprocessSpec(shape[2]!!, shape[3]!!, color == "grayscale", policy == "stretch", shorter, mean, std)
        }

        private fun floats(v: Any?, what: String): FloatArray {
            val list = v as? List<*>
            if (list == null || list.size != 3 || list.any { it !is Double }) {
                throw BundleException(BundleProblem.CORRUPT, "preprocess.json $what is not 3 numbers")
            }
            return FloatArray(3) { (list[it] as Double).toFloat() }
        }
    }
}

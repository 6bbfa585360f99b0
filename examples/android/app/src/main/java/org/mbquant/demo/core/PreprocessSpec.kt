package org.mbquant.demo.core

import org.json.JSONArray
import org.json.JSONException
import org.json.JSONObject

/** The bundle's preprocessing contract (preprocess.json, format mbquant-preprocess/1), checked when read with the
 *  platform's own org.json (android.jar on a phone; Debian's libandroid-json-java on the JVM). */
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
        private const val MAX_SIDE = 4096

        /** Parses preprocess.json; a BundleException names what is wrong. */
        fun parse(text: String): PreprocessSpec {
            val root = try { JSONObject(text) } catch (e: JSONException) {
                throw BundleException(BundleProblem.CORRUPT, "preprocess.json is not a JSON object: ${e.message}")
            }
            if (root.optString("format") != FORMAT) {
                throw BundleException(BundleProblem.CORRUPT,
                    "preprocess.json has format ${root.opt("format")}, expected $FORMAT")
            }
            val shape = ints(root.optJSONObject("input")?.optJSONArray("shape"))
            if (shape == null || shape.size != 4 || shape[0] != 1 || shape[1] != 3 ||
                shape.any { it <= 0 || it > MAX_SIDE }) {
                throw BundleException(BundleProblem.WRONG_INPUT, "preprocess.json input.shape $shape is not [1, 3, H, W]")
            }
            val color = root.optJSONObject("color")?.optString("mode")
            val resize = root.optJSONObject("resize")
            val policy = resize?.optString("policy")
            if (color != "grayscale" && color != "rgb") throw BundleException(BundleProblem.CORRUPT, "unknown color mode $color")
            if (policy != "stretch" && policy != "shorter-side-then-center-crop") {
                throw BundleException(BundleProblem.CORRUPT, "unknown resize policy $policy")
            }
            val mean = floats(root.optJSONArray("mean"), "mean")
            val std = floats(root.optJSONArray("std"), "std")
            if (std.any { it <= 0f }) throw BundleException(BundleProblem.CORRUPT, "std must be positive")
            val shorter = if (policy == "stretch") 0 else (ints(JSONArray().put(resize.opt("shorter_side")))?.get(0)
                ?: throw BundleException(BundleProblem.CORRUPT, "resize.shorter_side is missing"))
            return PreprocessSpec(shape[2], shape[3], color == "grayscale", policy == "stretch", shorter, mean, std)
        }

        /** The array's items as integers, or null when one is not an integer number. */
        private fun ints(a: JSONArray?): List<Int>? {
            if (a == null) return null
            val out = ArrayList<Int>()
            for (i in 0 until a.length()) {
                val v = a.opt(i) as? Number ?: return null
                if (v.toDouble() != Math.floor(v.toDouble())) return null
                out.add(v.toInt())
            }
            return out
        }

        private fun floats(a: JSONArray?, what: String): FloatArray {
            val values = (0 until (a?.length() ?: 0)).map { a?.opt(it) as? Number }
            if (a == null || values.size != 3 || values.any { it == null || it.toDouble().isNaN() || it.toDouble().isInfinite() }) {
                throw BundleException(BundleProblem.CORRUPT, "preprocess.json $what is not 3 finite numbers")
            }
            return FloatArray(3) { values[it]!!.toFloat() }
        }
    }
}
